"""Guided evolution: a (1+λ) search that improves a strong start, comparing plans on the same tokens.

EvoPress ranks each generation's offspring on a fresh random minibatch, so at a few thousand tokens selection
mostly ranks noise once the parent is good. Here:

- **Common tokens.** Every plan is judged on the same fixed evaluation windows (the fitness's pool: the first
  ``--fit-seqs`` calibration windows, where the fitted search measures too), so the parent's score is exact and
  known, and a child replaces it only when it is better on those very tokens. A race spends the tokens: every
  candidate and the parent first meet on a random quarter of the windows (the same quarter for all of them), the
  best quarter of the candidates go on to the full set.
- **A surrogate that learns.** The additive model (the fitted sensitivity's per-unit weights on the problem's
  sensitivity) predicts each mutation's KL; many more mutations are drawn than evaluated, the most promising by
  prediction are raced, plus a share drawn at random (what an additive model cannot see: interactions). Every
  plan measured on the full windows, and every plan the fitted search measured there (``ctx.measured``), refits
  it: the fitted search and the evolution share one history.

State (parent, measured plans, random generator, history) is checkpointed every generation; a killed search
resumes and ends with the same plan.
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
from allocator.search.checkpoint import FIX, count, number, plan_in, read_checkpoint, records, rng_state, scores_of
from allocator.search.evolution import mutate, score_all
from allocator.search.repair import level_ladders
from allocator.search.uniform import Uniform

_MIN_FIT = 10  # measured plans before the surrogate screens (its cross-validation needs two per fold)


@dataclass
class Guided(Searcher):
    """Surrogate-screened, raced (1+λ) evolution on fixed evaluation windows; ``start``: the initial parent."""

    name = "guided"
    generations: int = option(50, "evolution: generations")
    offspring: int = option(16, "evolution: offspring per generation")
    start: str = option("uniform", "evolution: start point", choices=("uniform", "knapsack"))
    screen: int = option(8, "guided: mutations drawn per offspring raced (the surrogate keeps the best)")
    explore: float = option(0.25, "guided: share of the raced offspring drawn at random, unscreened")

    def __post_init__(self) -> None:
        at_least("--generations", self.generations, 1)
        at_least("--offspring", self.offspring, 1)
        at_least("--screen", self.screen, 1)
        one_of("--start", self.start, ("uniform", "knapsack"))
        if not 0 <= self.explore <= 1:
            raise AllocatorError(f"--explore must be in [0, 1], got {self.explore}")

    def needs(self) -> frozenset[str]:
        """The real model's fitness and a sensitivity (the surrogate's prior, and a knapsack start)."""
        return frozenset({"fitness", "profile"})

    def fitness_pool(self, fit_seqs: int) -> int | None:
        """Every plan is judged on the first ``--fit-seqs`` windows (where the fitted search measured too)."""
        return fit_seqs

    def search(self, problem: Problem, ctx: SearchContext) -> SearchResult:
        fitness, prior = ctx.fitness, problem.sensitivity
        if fitness is None or prior is None:
            raise AllocatorError("guided evolution needs a fitness on the real model and a sensitivity profile")
        window = np.arange(fitness.pool_size)
        checkpoint = ctx.workdir / "guided_state.json" if ctx.workdir else None
        fields = {"generation": count, "parent": plan_in(problem), "measured": scores_of(problem),
                  "history": records, "elapsed_s": number, "rng": rng_state}  # fmt: skip
        state = read_checkpoint(checkpoint, self._key(problem, ctx.seed), fields) if ctx.resume else None
        if state is not None and _key(np.array(state["parent"])) not in state["measured"]:
            raise AllocatorError(f"checkpoint {checkpoint}: the parent's score is not among 'measured': {FIX}")
        if state is None:
            parent = self._start(problem)
            fitness.set_parent(parent)
            measured = {_key(np.asarray(c)): float(k) for c, k in ctx.measured}
            if _key(parent) not in measured:
                measured[_key(parent)] = score_all(fitness, [parent], window)[0]
            rng = np.random.default_rng(ctx.seed)
            state = {"generation": 0, "parent": parent.tolist(), "measured": measured, "history": [],
                     "elapsed_s": 0.0}  # fmt: skip
        else:
            rng = np.random.default_rng()
            rng.bit_generator.state = state["rng"]
            fitness.set_parent(np.array(state["parent"]))
        ladders, t0 = level_ladders(problem), time.perf_counter() - state["elapsed_s"]
        for gen in tqdm(range(state["generation"], self.generations), desc="guided evolution",
                        initial=state["generation"], total=self.generations, leave=False):  # fmt: skip
            parent, measured = np.array(state["parent"]), state["measured"]
            surrogate = _surrogate(prior, measured, ctx.seed)
            children = self._offspring(problem, parent, ladders, rng, surrogate, set(measured))
            quarter = np.sort(rng.choice(window, size=max(1, len(window) // 4), replace=False))
            first = score_all(fitness, [*children, parent], quarter)  # everyone on the same tokens
            margin = np.array(first[:-1]) - first[-1]
            keep = [children[i] for i in np.argsort(margin, kind="stable")[: max(1, len(children) // 4)]]
            full = score_all(fitness, keep, window)
            measured.update({_key(c): k for c, k in zip(keep, full, strict=True)})
            tokens = (len(children) + 1) * len(quarter) + len(keep) * len(window)
            best = int(np.argmin(full))
            if full[best] < measured[_key(parent)]:
                parent = keep[best]
                fitness.set_parent(parent)
            r2 = surrogate.held_out["r2"] if surrogate is not None else None
            record = {"generation": gen + 1, "fitness": measured[_key(parent)], "tokens": tokens * fitness.seq_len,
                      "evaluations": len(children) + 1 + len(keep), "measured": len(measured),
                      "time_s": time.perf_counter() - t0, "surrogate_r2": r2}  # fmt: skip
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
                "screen": self.screen, "explore": self.explore}  # fmt: skip


def _key(choice: np.ndarray) -> str:
    return ",".join(map(str, np.asarray(choice).tolist()))


def _surrogate(prior: np.ndarray, measured: dict[str, float], seed: int) -> AdditiveFit | None:
    """The additive model refit on every plan measured on the evaluation windows (None: too few yet)."""
    if len(measured) < _MIN_FIT:
        return None
    choices = np.array([[int(k) for k in key.split(",")] for key in measured])
    return fit(np.where(np.isfinite(prior), prior, 0.0), choices, np.array(list(measured.values())), seed=seed)
