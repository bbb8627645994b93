"""OWL (Yin et al., ICML 2024): layer-wise sparsity from outlier ratios.

density_l = 2λ (LOD_l − min LOD) / (max − min) − mean(·) + (1 − S), so sparsity_l lies in
[S − λ, S + λ], averages S, and blocks with more outliers (Wanda scores above M × their mean) are
pruned less (luuyin/OWL ``lib/prune_all.py``). Each unit takes the sparsity of its block; the grid
level nearest to it is chosen, then units furthest below their OWL target are pushed one level up
until the exact budget holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from allocator.budget import Problem
from allocator.errors import AllocatorError
from allocator.search.base import SearchContext, Searcher, SearchResult, option


@dataclass
class OWL(Searcher):
    """OWL with the paper's λ (M is fixed when the profile is measured, default 5)."""

    name = "owl"
    lam: float = option(0.08, "OWL's lambda: the sparsity spread around the target")

    def __post_init__(self) -> None:
        if not 0 <= self.lam < 1:
            raise AllocatorError(f"--lam must be in [0, 1) (OWL's sparsity spread), got {self.lam}")

    def needs(self) -> frozenset[str]:
        """Outlier ratios (measured with a sensitivity profile)."""
        return frozenset({"outliers"})

    def search(self, problem: Problem, ctx: SearchContext | None = None) -> SearchResult:
        """OWL's allocation snapped to the grid (deterministic; seed unused)."""
        if problem.budget is None or problem.budget.kind != "sparsity":
            raise AllocatorError("OWL allocates sparsity: use --target sparsity=S (or knapsack for bits/bytes)")
        if (error := problem.reach_error()) is not None:
            raise error
        lod = problem.outlier_ratio  # [U]
        span = lod.max() - lod.min()
        density = (lod - lod.min()) / span * 2 * self.lam if span > 0 else np.zeros_like(lod)
        density = density - density.mean() + (1 - problem.budget.value)
        target = 1 - density  # [U] OWL sparsity per unit
        sparsity = np.array([lv.sparsity if not lv.quantized and not lv.drop else np.nan for lv in problem.levels])
        allowed = np.isfinite(problem.cost) & np.isfinite(sparsity)[None, :]  # [U, K]
        if not allowed.any(axis=1).all():
            raise AllocatorError("OWL needs a sparsity level applicable to every layer in the grid")
        gap = np.where(allowed, np.abs(sparsity[None, :] - target[:, None]), np.inf)
        choice = gap.argmin(axis=1)  # [U] a fresh array: the problem stays read-only
        order = np.argsort(sparsity)  # levels from least to most sparse
        rank = np.empty_like(order)
        rank[order] = np.arange(len(order))
        while not problem.feasible(choice):
            behind = target - sparsity[choice]
            for u in np.argsort(-behind, kind="stable"):
                up = [k for k in order[rank[choice[u]] + 1 :] if allowed[u, k]]
                if up:
                    choice[u] = up[0]
                    break
            else:
                raise AllocatorError(f"OWL could not meet {problem.budget} with this grid: add sparser levels")
        return SearchResult(choice)
