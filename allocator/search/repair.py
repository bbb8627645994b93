"""Repair steps every searcher shares: a unit's levels in order of compression, and the projection of any
choice onto the budgets (optuna's proposals, the compact space's knapsack points, evolution's start)."""

from __future__ import annotations

import numpy as np

from allocator.budget import Problem
from allocator.errors import AllocatorError


def level_ladders(problem: Problem) -> list[np.ndarray]:
    """Per unit, its applicable levels from least to most compressed (decreasing primary cost)."""
    out = []
    for row in problem.cost:
        ok = np.flatnonzero(np.isfinite(row))
        out.append(ok[np.argsort(-row[ok], kind="stable")])
    return out


def project(problem: Problem, choice: np.ndarray, fill: bool = True) -> np.ndarray:
    """The nearest plan within every budget, found greedily and deterministically.

    Steps down (more compression) where the profile error grows least per unit of cost saved until
    feasible; with ``fill``, then steps up where error falls most per unit of cost while it stays
    feasible. Without a profile, cost alone decides (largest saving first).
    """
    choice = choice.copy()
    cost = problem.cost
    err = problem.sensitivity if problem.sensitivity is not None else np.zeros_like(cost)
    ladders = level_ladders(problem)
    rank = np.array([int(np.flatnonzero(ladders[u] == choice[u])[0]) for u in range(len(choice))])

    def step(u: int, d: int) -> tuple[float, float]:
        a, b = choice[u], ladders[u][rank[u] + d]
        return float(err[u, b] - err[u, a]), float(cost[u, a] - cost[u, b])

    while not problem.feasible(choice):
        options = [(max(step(u, 1)[0], 0.0) / max(step(u, 1)[1], 1e-12), u)
                   for u in range(len(choice)) if rank[u] < len(ladders[u]) - 1]  # fmt: skip
        if not options:
            raise AllocatorError("no plan of this grid meets the budget: loosen it or add more compressed levels")
        _, u = min(options)
        rank[u] += 1
        choice[u] = ladders[u][rank[u]]
    while fill:
        options = []
        for u in range(len(choice)):
            if rank[u] == 0:
                continue
            gain, extra = step(u, -1)
            trial = choice.copy()
            trial[u] = ladders[u][rank[u] - 1]
            if problem.feasible(trial):
                options.append((gain / max(-extra, 1e-12), u))  # gain <= 0: error removed per cost added
        if not options or problem.sensitivity is None:
            break
        _, u = min(options)
        rank[u] -= 1
        choice[u] = ladders[u][rank[u]]
    return choice
