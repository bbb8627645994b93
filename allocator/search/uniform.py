"""Uniform allocation: the same level for every layer, the baseline every paper reports."""

from __future__ import annotations

import numpy as np

from allocator.budget import Problem
from allocator.errors import AllocatorError


class Uniform:
    """The least-compressed level that, applied everywhere, keeps the budget."""

    def search(self, problem: Problem, seed: int) -> np.ndarray:
        """Return one level for all units (seed unused: the answer is deterministic)."""
        totals = problem.cost.sum(axis=0)  # [K]; inf where a level does not apply to some unit
        ok = [k for k in range(len(problem.levels)) if np.isfinite(totals[k])]
        feasible = [k for k in ok if problem.feasible(np.full(len(problem.units), k))]
        if not feasible:
            tightest = min(ok, key=lambda k: totals[k])
            raise AllocatorError(
                f"no uniform level meets the budget (limit {problem.limit:.6g}); the most compressed, "
                f"{problem.levels[tightest].name}, costs {totals[tightest]:.6g}: loosen the target or add "
                "more compressed levels to the grid"
            )
        best = max(feasible, key=lambda k: (totals[k], -k))
        return np.full(len(problem.units), best)
