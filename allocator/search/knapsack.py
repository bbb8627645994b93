"""Multi-choice knapsack over sensitivity profiles (ROCKET / SPDY / AutoRound's DP).

minimise Σ_u error[u, k_u]  subject to  Σ_u cost_j[u, k_u] <= limit_j for every budget j.

``Knapsack`` solves it exactly as a 0/1 integer program (scipy's HiGHS MILP; with a time limit
it returns the incumbent and its optimality gap). ``frontier`` returns the whole error-vs-budget
curve of the primary budget in one dynamic program over cost buckets (costs rounded up, so every
point is feasible; exact when costs are multiples of the bucket), as SPDY's DP does over time.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import coo_array

from allocator.budget import Problem, ceiling
from allocator.errors import AllocatorError
from allocator.search.base import SearchContext, Searcher, SearchResult, option

log = logging.getLogger(__name__)


def _require_error(problem: Problem) -> np.ndarray:
    if problem.sensitivity is None:
        raise AllocatorError("knapsack needs a sensitivity profile (per-layer errors): run with a profile")
    return problem.sensitivity


@dataclass
class Knapsack(Searcher):
    """Exact MILP; ``time_limit`` seconds (None: until proven optimal)."""

    name = "knapsack"
    time_limit: float | None = option(None, "knapsack MILP time limit in seconds (default: until optimal)", kind=float)

    def __post_init__(self) -> None:
        if self.time_limit is not None and not self.time_limit > 0:
            raise AllocatorError(f"--time-limit must be > 0 seconds, got {self.time_limit}")

    def needs(self) -> frozenset[str]:
        """It minimises the profile's summed error."""
        return frozenset({"profile"})

    def search(self, problem: Problem, ctx: SearchContext | None = None) -> SearchResult:
        """The choice of minimal summed error within every budget (deterministic; seed unused);
        ``stats["gap"]`` is the optimality gap (0 when proven optimal)."""
        if (error := problem.reach_error()) is not None:
            raise error
        err = _require_error(problem)
        U, K = err.shape
        ok = np.isfinite(err) & np.all([np.isfinite(c) for _, c, _ in problem.constraints()], axis=0)
        uu, kk = np.nonzero(ok)  # one binary variable per allowed (unit, level)
        n = len(uu)
        rows_one = coo_array((np.ones(n), (uu, np.arange(n))), shape=(U, n))  # exactly one level per unit
        options = {"time_limit": self.time_limit} if self.time_limit else {}
        # real-valued rows first admit plans exactly at the limit (speedup=1: all dense); only if the solver's
        # tolerance then lets a point over the exact limit through are they solved again a margin inside it
        for inside in (False, True):
            rows = [LinearConstraint(rows_one, 1, 1)] + [_budget_row(cost[uu, kk], limit, inside)
                                                         for _, cost, limit in problem.constraints()]  # fmt: skip
            res = milp(err[uu, kk], constraints=rows, integrality=np.ones(n), bounds=Bounds(0, 1), options=options)
            if res.x is None:
                raise AllocatorError(f"knapsack found no solution within the budget ({res.message}): loosen the target")
            x = res.x > 0.5
            choice = np.zeros(U, dtype=int)
            choice[uu[x]] = kk[x]
            if problem.feasible(choice) and np.bincount(uu[x], minlength=U).max() == 1:
                break
        else:
            raise AllocatorError("knapsack solution failed the exact budget check: report this with the grid used")
        gap = float(getattr(res, "mip_gap", 0.0) or 0.0) if res.status != 0 else 0.0
        if res.status != 0:
            log.warning("knapsack stopped early (%s); optimality gap %.3g", res.message, gap)
        return SearchResult(choice, stats={"gap": gap})


def _budget_row(cost: np.ndarray, limit: float, inside: bool) -> LinearConstraint:
    """One budget as a MILP row that no solver tolerance can turn into an over-budget 0/1 point.

    Integer costs (weights, bits) and eighths (bytes): the limit is rounded down to that grain, so a
    tolerance below one grain admits nothing infeasible. Real costs (milliseconds from a latency
    table): the row is scaled to the limit; ``inside`` keeps it a relative 1e-6 inside it (for when the
    solver's tolerance let a point over the limit through), else it admits the limit itself.
    """
    for grain in (1, 8):
        if np.allclose(cost * grain, np.round(cost * grain)):
            return LinearConstraint(cost[None, :], -np.inf, math.floor(limit * grain * (1 + 1e-12) + 1e-6) / grain)
    if limit <= 0:  # below the fixed overhead: nothing fits, and reach_error has said so
        return LinearConstraint(cost[None, :], -np.inf, limit)
    return LinearConstraint(cost[None, :] / limit, -np.inf, 1 - 1e-6 if inside else ceiling(limit) / limit)


@dataclass
class FrontierPoint:
    """One point of the error-vs-budget curve."""

    limit: float
    choice: np.ndarray
    error: float
    cost: float


def frontier(problem: Problem, limits: list[float], buckets: int = 10_000) -> list[FrontierPoint]:
    """Minimal-error choices for each of ``limits`` (primary budget) from one DP over cost buckets.

    Costs are rounded up to ``max(limits) / buckets`` so that every returned choice is feasible.
    """
    err = _require_error(problem)
    U, K = err.shape
    cost = problem.cost
    delta = max(limits) / buckets
    steps = np.where(np.isfinite(cost), np.ceil(cost / delta - 1e-9), np.inf)  # [U, K] bucket counts
    B = buckets + 1
    D = np.full(B, np.inf)
    D[0] = 0.0
    arg = np.zeros((U, B), dtype=np.int16)
    for u in range(U):
        best = np.full(B, np.inf)
        for k in range(K):
            if not np.isfinite(steps[u, k]) or not np.isfinite(err[u, k]) or steps[u, k] >= B:
                continue
            s = int(steps[u, k])
            cand = np.full(B, np.inf)
            cand[s:] = D[: B - s] + err[u, k]
            better = cand < best
            best[better] = cand[better]
            arg[u, better] = k
        D = best
    # the best state at or under each limit: a running minimum over buckets
    order = np.minimum.accumulate(D)
    at = np.zeros(B, dtype=int)
    for c in range(1, B):
        at[c] = c if D[c] < order[c - 1] else at[c - 1]
    points = []
    for limit in limits:
        c = int(math.floor(limit / delta + 1e-9))
        c = min(c, B - 1)
        if not np.isfinite(order[c]):
            points.append(FrontierPoint(limit, np.array([], dtype=int), math.inf, math.inf))
            continue
        state = at[c]
        choice = np.zeros(U, dtype=int)
        for u in range(U - 1, -1, -1):
            k = int(arg[u, state])
            choice[u] = k
            state -= int(steps[u, k])
        points.append(FrontierPoint(limit, choice, float(err[np.arange(U), choice].sum()), problem.total_cost(choice)))
    return points
