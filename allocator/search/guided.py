"""Guided evolution: a (1+λ) search that improves a strong start, every child judged against its parent.

EvoPress ranks offspring on a fresh random minibatch and meets the parent only in the last stage. Near a
good start the children differ from the parent by less than one minibatch differs from the next, so what
decides is the *paired* difference. Here:

- **Common tokens, fresh each stage.** Every stage of the race (``--stages``, as evolution's) draws fresh
  calibration windows and scores the parent on them beside the candidates: each child's difference to its
  parent is measured on the same tokens (common random numbers), the best go on, and a child replaces the
  parent only when it beats it on the last stage's tokens, which chose nothing before. Fresh windows keep the
  search from fitting a fixed set (the first version judged on 16 fixed windows and reached 0.915x the start's
  held-out KL where evolution reached 0.880x, on the GPU at commit d3a4882).
- **A surrogate that learns.** The additive model (per-unit weights on the problem's sensitivity) is fitted to
  every paired difference measured so far, and to the plans the fitted search measured (``ctx.measured``, on
  the pool's first windows: differences among them on shared tokens too), so the fitted search and the
  evolution share one history. Many more mutations are drawn than raced; the surrogate keeps those it
  predicts best, and a share is drawn at random (what an additive model cannot see: interactions).

State (parent, paired differences, random generator, history) is checkpointed every generation; a killed
search resumes and ends with the same plan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from allocator.budget import Problem
from allocator.errors import AllocatorError
from allocator.io import write_json_atomic
from allocator.search.additive import AdditiveFit, fit
from allocator.search.base import SearchContext, Searcher, SearchResult, at_least, one_of, option
from allocator.search.checkpoint import count, number, pairs_of, plan_in, read_checkpoint, records, rng_state
from allocator.search.evolution import fresh_batch, mutate, parse_stages, score_all
from allocator.search.repair import level_ladders
from allocator.search.uniform import Uniform

_MIN_FIT = 10  # paired differences before the surrogate screens (its cross-validation needs two per fold)


@dataclass
class Guided(Searcher):
    """Surrogate-screened (1+λ) evolution raced against its parent on common tokens; ``start``: the initial parent."""

    name = "guided"
    generations: int = option(50, "evolution: generations")
    offspring: int = option(16, "evolution: offspring per generation")
    start: str = option("uniform", "evolution: start point", choices=("uniform", "knapsack"))
    screen: int = option(8, "guided: mutations drawn per offspring raced (the surrogate keeps the best)")
    explore: float = option(0.25, "guided: share of the raced offspring drawn at random, unscreened")
    stages: str = option("4@1024,1@4096", "guided: race SURVIVORS@TOKENS,... on fresh windows, the parent in each")

    def __post_init__(self) -> None:
        at_least("--generations", self.generations, 1)
        at_least("--offspring", self.offspring, 1)
        at_least("--screen", self.screen, 1)
        one_of("--start", self.start, ("uniform", "knapsack"))
        if not 0 <= self.explore <= 1:
            raise AllocatorError(f"--explore must be in [0, 1], got {self.explore}")
        parse_stages(self.stages)

    def needs(self) -> frozenset[str]:
        """The real model's fitness and a sensitivity (the surrogate's prior, and a knapsack start)."""
        return frozenset({"fitness", "profile"})

    def fitness_pool(self, fit_seqs: int) -> int | None:
        """Every calibration window (the fitted search measured on the first ``--fit-seqs`` of them)."""
        return None

    def search(self, problem: Problem, ctx: SearchContext) -> SearchResult:
        fitness, prior = ctx.fitness, problem.sensitivity
        if fitness is None or prior is None:
            raise AllocatorError("guided evolution needs a fitness on the real model and a sensitivity profile")
        checkpoint = ctx.workdir / "guided_state.json" if ctx.workdir else None
        fields = {"generation": count, "parent": plan_in(problem), "pairs": pairs_of(problem), "history": records,
                  "elapsed_s": number, "rng": rng_state}  # fmt: skip
        state = read_checkpoint(checkpoint, self._key(problem, ctx.seed), fields) if ctx.resume else None
        if state is None:
            known = [(_key(np.asarray(c)), float(k)) for c, k in ctx.measured]  # on shared windows: differences
            pairs = [[c, known[0][0], k - known[0][1]] for c, k in known[1:]]
            state = {"generation": 0, "parent": self._start(problem).tolist(), "pairs": pairs, "history": [],
                     "elapsed_s": 0.0}  # fmt: skip
            rng = np.random.default_rng(ctx.seed)
        else:
            rng = np.random.default_rng()
            rng.bit_generator.state = state["rng"]
        fitness.set_parent(np.array(state["parent"]))
        stages, ladders = parse_stages(self.stages), level_ladders(problem)
        t0 = time.perf_counter() - state["elapsed_s"]
        for gen in tqdm(range(state["generation"], self.generations), desc="guided evolution",
                        initial=state["generation"], total=self.generations, leave=False):  # fmt: skip
            parent, pairs = np.array(state["parent"]), state["pairs"]
            surrogate = _surrogate(prior, pairs, ctx.seed)
            seen = {_key(parent), *(p[0] for p in pairs if p[1] == _key(parent))}
            candidates = self._offspring(problem, parent, ladders, rng, surrogate, seen)
            tokens = evaluations = 0
            for survivors, n_tokens in stages:  # the race: the parent on the same fresh windows in every stage
                batch = fresh_batch(fitness, n_tokens, rng)
                scores = score_all(fitness, [*candidates, parent], batch)
                delta = np.array(scores[:-1]) - scores[-1]
                pairs += [[_key(c), _key(parent), float(d)] for c, d in zip(candidates, delta, strict=True)]
                tokens += len(scores) * len(batch) * fitness.seq_len
                evaluations += len(scores)
                order = np.argsort(delta, kind="stable")[:survivors]
                candidates, best, parent_score = [candidates[i] for i in order], float(delta[order[0]]), scores[-1]
            if best < 0:  # better than the parent on tokens that selected nothing before
                parent = candidates[0]
                fitness.set_parent(parent)
            r2 = surrogate.held_out["r2"] if surrogate is not None else None
            record = {"generation": gen + 1, "fitness": parent_score + min(best, 0.0), "delta": best, "tokens": tokens,
                      "evaluations": evaluations, "pairs": len(pairs), "time_s": time.perf_counter() - t0,
                      "surrogate_r2": r2}  # fmt: skip
            state.update(generation=gen + 1, parent=parent.tolist(), rng=rng.bit_generator.state,
                         elapsed_s=time.perf_counter() - t0)  # fmt: skip
            state["history"].append(record)
            if ctx.observer is not None:
                ctx.observer(record, parent)
            if checkpoint is not None:
                write_json_atomic(checkpoint, {"key": self._key(problem, ctx.seed), **state})
        return SearchResult(np.array(state["parent"]), history=state["history"])

    def _start(self, problem: Problem) -> np.ndarray:
        from allocator.search.knapsack import Knapsack

        return Knapsack().search(problem).choice if self.start == "knapsack" else Uniform.choice(problem)

    def _offspring(self, problem: Problem, parent: np.ndarray, ladders, rng, surrogate: AdditiveFit | None,
                   seen: set[str]) -> list[np.ndarray]:  # fmt: skip
        """``offspring`` new mutations: the surrogate's best of ``screen`` times as many, and a random share."""
        pool: dict[str, np.ndarray] = {}
        for _ in range(50 * self.offspring * self.screen):
            if len(pool) == self.offspring * self.screen:
                break
            child = mutate(problem, parent, ladders, rng)
            if child is not None and _key(child) not in seen:
                pool.setdefault(_key(child), child)
        if not pool:
            raise AllocatorError("guided evolution found no new budget-keeping mutation: the grid needs more levels")
        drawn = list(pool.values())
        if surrogate is None:
            return drawn[: self.offspring]
        random = int(round(self.explore * self.offspring))
        explored = [drawn[i] for i in rng.permutation(len(drawn))[:random]]
        costs = surrogate.costs(problem.sensitivity)
        rows = np.arange(len(parent))
        ranked = sorted(drawn, key=lambda c: float(costs[rows, c].sum()))
        chosen = {_key(c): c for c in explored}
        for child in ranked:
            if len(chosen) >= self.offspring:
                break
            chosen.setdefault(_key(child), child)
        return list(chosen.values())

    def _key(self, problem: Problem, seed: int) -> dict:
        return {"units": [list(u) for u in problem.units], "levels": [lv.name for lv in problem.levels],
                "limit": problem.limit, "seed": seed, "start": self.start, "offspring": self.offspring,
                "screen": self.screen, "explore": self.explore, "stages": self.stages}  # fmt: skip


def _key(choice: np.ndarray) -> str:
    return ",".join(map(str, np.asarray(choice).tolist()))


def _surrogate(prior: np.ndarray, pairs: list[list], seed: int) -> AdditiveFit | None:
    """The additive model fitted to every paired difference measured so far (None: too few yet)."""
    if len(pairs) < _MIN_FIT:
        return None
    plans = np.array([[[int(k) for k in key.split(",")] for key in pair[:2]] for pair in pairs])  # [P, 2, U]
    deltas = np.array([pair[2] for pair in pairs])
    return fit(prior, plans[:, 0], deltas, seed=seed, baseline=plans[:, 1])  # fit zeroes the prior's +inf itself
