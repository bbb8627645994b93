"""The fitted search (SPDY's idea): an additive model of the real model's KL, refit on every measured plan.

The problem's error matrix is a *prior* (a profile column: measured single-layer KL, or the Fisher-weighted
error). Per-unit weights on it are fitted (:mod:`allocator.search.additive`) to the measured KL of random
feasible plans around the uniform plan, then ``fit_rounds`` rounds of knapsack → measure the solution and
three neighbours → refit. Every solution is measured, the plain prior's included, and the solution that
measured the lowest KL is the plan: a fit made from plans far from the optimum can mislead the solver, and
then the prior's own plan wins. The fitted costs come back with the plan, so ``--sensitivity fitted``
(knapsack's default) is the knapsack on them. Measured plans are checkpointed as they come: a killed
search resumes without measuring any plan twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from allocator.budget import Problem
from allocator.errors import AllocatorError
from allocator.io import write_json_atomic
from allocator.search.additive import AdditiveFit, fit
from allocator.search.base import SearchContext, Searcher, SearchResult, at_least, one_of, option
from allocator.search.checkpoint import read_checkpoint, scores_of
from allocator.search.evolution import mutate
from allocator.search.knapsack import Knapsack
from allocator.search.repair import level_ladders
from allocator.search.uniform import Uniform

log = logging.getLogger(__name__)
_MIN_PLANS = 10  # fewer measured plans than this: no fit (5-fold cross-validation needs two per fold)
PRIORS = ("auto", "kl", "fisher")


def random_plans(
    problem: Problem, start: np.ndarray, n: int, seed: int, steps: tuple[int, int] = (4, 40)
) -> np.ndarray:
    """Up to ``n`` distinct feasible plans, each ``start`` after a random number of budget-keeping level switches."""
    rng = np.random.default_rng(seed)
    ladders, plans, seen = level_ladders(problem), [], {start.tobytes()}
    for _ in range(50 * n):
        if len(plans) == n:
            break
        plan = start.copy()
        for _ in range(int(rng.integers(steps[0], steps[1] + 1))):
            plan = mutate(problem, plan, ladders, rng) if plan is not None else None
        if plan is not None and plan.tobytes() not in seen:
            seen.add(plan.tobytes())
            plans.append(plan)
    return np.array(plans, dtype=int).reshape(len(plans), len(start))  # fewer than n where the grid allows no more


def refine(
    problem: Problem,
    prior: np.ndarray,
    measure: Callable[[np.ndarray], float],
    solve: Callable[[np.ndarray], np.ndarray],
    start: np.ndarray,
    plans: int = 48,
    rounds: int = 4,
    per_round: int = 4,
    seed: int = 0,
) -> tuple[AdditiveFit, np.ndarray, dict]:
    """Fit on ``plans`` random plans around ``start``, then ``rounds`` × (solve → measure the solution and
    ``per_round`` − 1 of its neighbours → refit). Returns the fit whose solution measured best, that
    solution, and a record of every plan and round."""
    measured: dict[bytes, tuple[np.ndarray, float]] = {}

    def score(choice: np.ndarray) -> float:
        if choice.tobytes() not in measured:
            measured[choice.tobytes()] = (choice, float(measure(choice)))
        return measured[choice.tobytes()][1]

    def refit() -> AdditiveFit:
        choices, kl = zip(*measured.values(), strict=True)
        if len(kl) < _MIN_PLANS:  # a grid or budget with too few distinct plans: the prior as it is
            return AdditiveFit(np.ones(prior.shape[0]), 0.0, {"plans": len(kl), "note": "too few plans to fit"})
        return fit(prior, np.array(choices), np.array(kl), seed=seed)

    for choice in tqdm([start, *random_plans(problem, start, plans - 1, seed)], desc="fitted: random plans",
                       leave=False):  # fmt: skip
        score(choice)
    model = AdditiveFit(np.ones(prior.shape[0]), 0.0, {"note": "the prior itself"})
    history: list[dict] = []
    best: tuple[float, int, AdditiveFit, np.ndarray] | None = None  # (measured KL of the solution, round, fit, it)
    rng, ladders = np.random.default_rng(seed + 1), level_ladders(problem)
    for r in tqdm(range(-1, rounds + 1), desc="fitted: rounds", leave=False):
        if r >= 0:
            model = refit()
        try:
            proposal = solve(model.costs(prior))
        except AllocatorError as exc:  # e.g. a limit no MILP point meets within its safety margin
            history.append({"round": r, "plans": len(measured), "stopped": str(exc)})
            break
        proposal_kl = score(proposal)
        history.append({"round": r, "plans": len(measured), **model.held_out, "proposal_kl": proposal_kl})
        if best is None or proposal_kl < best[0]:
            best = (proposal_kl, r, model, proposal)
        for _ in range(per_round - 1 if 0 <= r < rounds else 0):  # neighbours of the fits' solutions
            child = mutate(problem, proposal, ladders, rng)
            if child is not None:
                score(child)
    if best is None:
        raise AllocatorError("the fitted search found no plan within the budget: loosen the target")
    choices, kl = zip(*measured.values(), strict=True)
    fits = [h for h in history if "spearman" in h]  # how well the last fit predicts plans it did not see
    record = {"history": history, "chosen_round": best[1],
              "held_out": {k: fits[-1][k] for k in ("spearman", "r2", "plans", "folds")} if fits else {},
              "choices": np.array(choices).tolist(), "kl": list(kl)}  # fmt: skip
    return best[2], best[3], record


# what the fitted search measures when the run does not say: ~80 plans on 8 windows take a minute on a GPU and
# over 20 on two CPU cores; on a CPU fewer plans on fewer windows (benchmark: scripts/bench_cpu_defaults.py)
GPU_FIT = {"fit_plans": 64, "fit_rounds": 4, "fit_seqs": 8}
CPU_FIT = {"fit_plans": 16, "fit_rounds": 1, "fit_seqs": 2}


@dataclass
class Fitted(Searcher):
    """Knapsack on an additive model of the measured KL, refit round by round; the plan that measured best."""

    name = "fitted"
    fit_prior: str = option("auto", "fitted: the prior it re-weights (auto: kl if already measured or, on a GPU, "
                            "if measuring it takes at most 2 min; else fisher)", choices=PRIORS)  # fmt: skip
    fit_plans: int | None = option(
        None,
        "fitted: random feasible plans measured before the first fit (default: "
        f"{GPU_FIT['fit_plans']} on a GPU, {CPU_FIT['fit_plans']} on a CPU)",
        kind=int,
    )
    fit_rounds: int | None = option(
        None,
        "fitted: knapsack-measure-refit rounds after the first fit (default: "
        f"{GPU_FIT['fit_rounds']} on a GPU, {CPU_FIT['fit_rounds']} on a CPU)",
        kind=int,
    )
    time_limit: float | None = option(None, "knapsack MILP time limit in seconds (default: until optimal)", kind=float)

    def __post_init__(self) -> None:
        one_of("--fit-prior", self.fit_prior, PRIORS)
        if self.fit_plans is not None:
            at_least("--fit-plans", self.fit_plans, 1)
        if self.fit_rounds is not None:
            at_least("--fit-rounds", self.fit_rounds, 0)
        Knapsack(self.time_limit)  # its own checks

    def needs(self) -> frozenset[str]:
        """The prior (a profile column) and the real model's fitness."""
        return frozenset({"profile", "fitness"})

    def sensitivity(self, asked: str) -> str:
        """The profile column the problem must carry: this search's prior, whatever the run asked for."""
        return self.fit_prior

    def fitness_pool(self, fit_seqs: int) -> int | None:
        """Each plan is measured on the first ``--fit-seqs`` windows."""
        return fit_seqs

    def search(self, problem: Problem, ctx: SearchContext) -> SearchResult:
        """The best measured knapsack plan over the fitted costs; ``costs`` and ``record`` come back with it."""
        fitness, prior = ctx.fitness, problem.sensitivity
        if fitness is None or prior is None:
            raise AllocatorError("the fitted search needs a prior (a profile) and a fitness on the real model")
        state_file = ctx.workdir / "fitted_state.json" if ctx.workdir else None
        known = _load(state_file, problem, ctx.seed) if ctx.resume else {}
        rows = np.arange(fitness.pool_size)
        start = Uniform.choice(problem)
        fitness.set_parent(start)
        knapsack = Knapsack(self.time_limit)
        t0 = time.perf_counter()

        def measure(choice: np.ndarray) -> float:
            key = ",".join(map(str, choice))
            if key not in known:
                known[key] = fitness(choice, rows)
                if state_file is not None:  # every measured plan kept: a resumed search measures none twice
                    write_json_atomic(state_file, {"key": _key(problem, ctx.seed), "kl": known})
            return known[key]

        def solve(costs: np.ndarray) -> np.ndarray:
            return knapsack.search(problem.with_sensitivity(costs)).choice

        plans = GPU_FIT["fit_plans"] if self.fit_plans is None else self.fit_plans  # unresolved: a GPU's
        rounds = GPU_FIT["fit_rounds"] if self.fit_rounds is None else self.fit_rounds
        model, choice, record = refine(problem, prior, measure, solve, start, plans=plans, rounds=rounds,
                                       seed=ctx.seed)  # fmt: skip
        record = {**record, "prior": self.fit_prior, "fit_s": time.perf_counter() - t0,
                  "weights": model.weights.tolist(), "lam": model.lam,
                  "kl_tokens": int(fitness.pool_size * fitness.seq_len)}  # fmt: skip
        log.info("fitted search: held-out %s, round %s chosen", record["held_out"], record["chosen_round"])
        return SearchResult(choice, history=record["history"], costs=model.costs(prior), record=record)


def _key(problem: Problem, seed: int) -> dict:
    return {"units": [list(u) for u in problem.units], "levels": [lv.name for lv in problem.levels],
            "limit": problem.limit, "seed": seed}  # fmt: skip


def _load(path: Path | None, problem: Problem, seed: int) -> dict[str, float]:
    """The plans a killed fitted search measured (empty when there is no state to resume)."""
    saved = read_checkpoint(path, _key(problem, seed), {"kl": scores_of(problem)})
    return {} if saved is None else {k: float(v) for k, v in saved["kl"].items()}
