"""Uniform allocation: the same level for every layer, the baseline every paper reports."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from allocator.budget import Problem
from allocator.errors import AllocatorError
from allocator.search.base import SearchContext, Searcher, SearchResult


@dataclass
class Uniform(Searcher):
    """The least-compressed level that, applied everywhere, keeps every budget."""

    name = "uniform"

    def search(self, problem: Problem, ctx: SearchContext | None = None) -> SearchResult:
        """One level for all units (deterministic: the seed is unused)."""
        return SearchResult(self.choice(problem))

    @staticmethod
    def choice(problem: Problem) -> np.ndarray:
        """The uniform plan itself (other searchers start from it)."""
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
