"""EvoPress-style (1+λ) evolutionary search with level-switch mutation and multi-step selection.

Each generation makes λ distinct offspring of the parent: k = min(U(1,3), U(1,3)) times, one unit
goes one level less compressed and randomly chosen other units go one level more compressed until
every budget holds again (so the budget is never broken; the slack left is below one level step of
one unit). Offspring are ranked on a fresh random minibatch of few calibration sequences, the
survivors on more, and in the last stage the parent competes too: it is replaced only by a better
child (Sieberling et al. 2024, Alg. 1). The state (parent, RNG, history) is checkpointed after every
generation with an atomic write, so a killed search resumes and ends with the same plan.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from allocator.budget import Problem
from allocator.errors import AllocatorError
from allocator.io import write_json_atomic
from allocator.search.base import Fitness, SearchContext, Searcher, SearchResult, at_least, one_of, option
from allocator.search.checkpoint import count, number, plan_in, read_checkpoint, records, rng_state
from allocator.search.repair import level_ladders
from allocator.search.uniform import Uniform

log = logging.getLogger(__name__)


def parse_stages(text: str) -> list[tuple[int, int]]:
    """``"8@1024,2@4096,1@16384"`` -> [(survivors, tokens), ...] (EvoPress's selection schedule)."""
    try:
        stages = [(int(s), int(t)) for s, t in (part.split("@") for part in text.split(","))]
    except ValueError:
        raise AllocatorError(f"bad selection stages {text!r}: write SURVIVORS@TOKENS,... e.g. 4@1024,1@4096") from None
    if not stages or stages[-1][0] != 1 or any(s < 1 or t < 1 for s, t in stages):
        raise AllocatorError(f"selection stages {text!r} must end with 1 survivor and use positive numbers")
    return stages


@dataclass
class Evolution(Searcher):
    """The search; ``start`` is a method name (uniform, knapsack) giving the initial parent."""

    name = "evolution"
    generations: int = option(50, "evolution: generations")
    offspring: int = option(16, "evolution: offspring per generation")
    stages: str = option("4@1024,1@4096", "evolution: selection SURVIVORS@TOKENS,... (the last keeps 1)")
    start: str = option("uniform", "evolution: start point", choices=("uniform", "knapsack"))
    probe: int = 0  # >0: also record the parent's KL on the first ``probe`` pool sequences (a fixed yardstick)

    def __post_init__(self) -> None:  # refused when the searcher is made, before any model work
        at_least("--generations", self.generations, 1)
        at_least("--offspring", self.offspring, 1)
        parse_stages(self.stages)
        one_of("--start", self.start, ("uniform", "knapsack"))

    def needs(self) -> frozenset[str]:
        """The real model's fitness; a knapsack start also the profile."""
        return frozenset({"fitness", "profile"} if self.start == "knapsack" else {"fitness"})

    def search(self, problem: Problem, ctx: SearchContext) -> SearchResult:
        """Evolve a choice under the problem's budgets with ``ctx.fitness``; checkpoint in ``ctx.workdir``."""
        fitness: Fitness | None = ctx.fitness
        if fitness is None:
            raise AllocatorError("evolution needs a fitness on the real model (a level database and calibration data)")
        seed = ctx.seed
        checkpoint = ctx.workdir / "evolution_state.json" if ctx.workdir else None
        stages = parse_stages(self.stages)
        ladders = level_ladders(problem)
        state = self._load(problem, seed, checkpoint) if ctx.resume else None
        if state is None:
            parent = _start(self.start, problem)
            rng = np.random.default_rng(seed)
            state = {"generation": 0, "parent": parent.tolist(), "history": [], "elapsed_s": 0.0}
        else:
            rng = np.random.default_rng()
            rng.bit_generator.state = state["rng"]
            parent = np.array(state["parent"])
        history: list[dict] = state["history"]
        counters = getattr(fitness, "counters", None)
        if counters is not None and history:  # a resumed search counts on from where it was killed
            counters.update({k: v for k, v in history[-1].items() if k in counters})
        fitness.set_parent(parent)
        t_start = time.perf_counter() - state["elapsed_s"]
        # the fitness of a generation is measured on a fresh minibatch (noisy); the probe is a fixed one,
        # so runs from different starts can be compared generation by generation
        probe = np.arange(min(self.probe, fitness.pool_size))
        probed = {"parent_kl": _uncounted(fitness, parent, probe)} if self.probe else {}
        if self.probe and not history:
            history.append({"generation": 0, "fitness": None, "tokens": 0, "time_s": 0.0, **probed})
        for gen in tqdm(range(state["generation"], self.generations), desc="evolution", initial=state["generation"],
                        total=self.generations, leave=False):  # fmt: skip
            children = self._offspring(problem, parent, ladders, rng)
            candidates, tokens, evaluations = children, 0, 0
            for s, (survivors, n_tokens) in enumerate(stages):
                if s == len(stages) - 1:
                    candidates = [*candidates, parent]  # elitism: the parent must be beaten
                batch = fresh_batch(fitness, n_tokens, rng)
                scores = score_all(fitness, candidates, batch)
                tokens += len(candidates) * len(batch) * fitness.seq_len
                evaluations += len(candidates)
                order = np.argsort(scores, kind="stable")[:survivors]
                candidates, best_score = [candidates[i] for i in order], float(scores[order[0]])
            if not np.array_equal(candidates[0], parent):
                parent = candidates[0]
                fitness.set_parent(parent)
                probed = {"parent_kl": _uncounted(fitness, parent, probe)} if self.probe else {}
            elapsed = time.perf_counter() - t_start
            record = {"generation": gen + 1, "fitness": best_score, "tokens": tokens, "evaluations": evaluations,
                      "time_s": elapsed, **probed, **getattr(fitness, "counters", {})}  # fmt: skip
            history.append(record)
            if ctx.observer is not None:
                ctx.observer(record, parent)
            state = {"generation": gen + 1, "parent": parent.tolist(), "history": history,
                     "elapsed_s": time.perf_counter() - t_start, "rng": rng.bit_generator.state}  # fmt: skip
            if checkpoint is not None:
                write_json_atomic(checkpoint, {"key": self._key(problem, seed), **state})
        return SearchResult(parent, history=history)

    # ---- mutation ------------------------------------------------------------------------------
    def _offspring(self, problem: Problem, parent: np.ndarray, ladders, rng) -> list[np.ndarray]:
        children: list[np.ndarray] = []
        seen = {parent.tobytes()}
        for _ in range(50 * self.offspring):
            if len(children) == self.offspring:
                break
            child = mutate(problem, parent, ladders, rng)
            if child is not None and child.tobytes() not in seen:
                seen.add(child.tobytes())
                children.append(child)
        if not children:
            raise AllocatorError("evolution found no budget-keeping mutation: the grid needs more levels")
        return children

    # ---- checkpoint ----------------------------------------------------------------------------
    def _key(self, problem: Problem, seed: int) -> dict:
        return {"units": [list(u) for u in problem.units], "levels": [lv.name for lv in problem.levels],
                "limit": problem.limit, "seed": seed, "start": self.start, "stages": self.stages,
                "offspring": self.offspring}  # fmt: skip

    def _load(self, problem: Problem, seed: int, checkpoint: Path | None) -> dict | None:
        fields = {"generation": count, "parent": plan_in(problem), "history": records, "elapsed_s": number,
                  "rng": rng_state}  # fmt: skip
        saved = read_checkpoint(checkpoint, self._key(problem, seed), fields)
        if saved is not None:
            log.info("resuming evolution at generation %d", saved["generation"])
        return saved


def _start(method: str, problem: Problem) -> np.ndarray:
    """The initial parent: the uniform plan, or the knapsack's over the profile."""
    if method == "knapsack":
        from allocator.search.knapsack import Knapsack

        return Knapsack().search(problem).choice
    return Uniform.choice(problem)


def fresh_batch(fitness: Fitness, n_tokens: int, rng) -> np.ndarray:
    """A stage's windows: enough distinct pool windows for ``n_tokens`` (all of them at most), drawn anew."""
    n_seq = min(fitness.pool_size, -(-n_tokens // fitness.seq_len))
    return np.sort(rng.choice(fitness.pool_size, size=n_seq, replace=False))


def score_all(fitness: Fitness, choices: list[np.ndarray], batch: np.ndarray) -> list[float]:
    """Each choice's fitness on ``batch``: in one call where the fitness can (one host sync on a GPU)."""
    many = getattr(fitness, "scores", None)
    return many(choices, batch) if many is not None else [fitness(c, batch) for c in choices]


def _uncounted(fitness: Fitness, choice: np.ndarray, batch: np.ndarray) -> float:
    """Score ``choice`` without adding to the fitness's block-forward counters (the probe is bookkeeping)."""
    counters = dict(getattr(fitness, "counters", {}))
    value = fitness(choice, batch)
    if counters:
        fitness.counters.update(counters)  # type: ignore[attr-defined]
    return value


def mutate(problem: Problem, parent: np.ndarray, ladders: list[np.ndarray], rng) -> np.ndarray | None:
    """A level-switch mutation of ``parent`` that keeps every budget (None if none was found)."""
    child = parent.copy()
    rank = [int(np.flatnonzero(ladders[u] == child[u])[0]) for u in range(len(child))]
    for _ in range(min(rng.integers(1, 4), rng.integers(1, 4))):
        up = [u for u in range(len(child)) if rank[u] > 0]
        if not up:
            return None
        i = up[rng.integers(len(up))]
        rank[i] -= 1
        child[i] = ladders[i][rank[i]]
        while not problem.feasible(child):
            down = [u for u in range(len(child)) if u != i and rank[u] < len(ladders[u]) - 1]
            if not down:
                return None
            j = down[rng.integers(len(down))]
            rank[j] += 1
            child[j] = ladders[j][rank[j]]
    return child
