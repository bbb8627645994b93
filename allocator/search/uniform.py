"""Uniform allocation: the same level for every layer, the baseline every paper reports."""

from __future__ import annotations

import numpy as np

from allocator.budget import Problem
from allocator.errors import AllocatorError


class Uniform:
    """The least-compressed level that, applied everywhere, keeps every budget."""

    def search(self, problem: Problem, seed: int) -> np.ndarray:
        """Return one level for all units (seed unused: the answer is deterministic)."""
        if (error := problem.reach_error()) is not None:
            raise error
        totals = problem.cost.sum(axis=0)  # [K]; inf where a level does not apply to some unit
        n = len(problem.units)
        feasible = [k for k in range(len(problem.levels)) if np.isfinite(totals[k]) and problem.feasible(np.full(n, k))]
        if not feasible:
            raise AllocatorError(
                f"no single level of the grid meets the budget {problem.budget} for every layer: "
                "add the target level to --levels or use a non-uniform method (knapsack)"
            )
        best = max(feasible, key=lambda k: (totals[k], -k))
        return np.full(n, best)
