"""Knapsack against brute force over every level combination; the frontier DP; OWL's rule."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from allocator.budget import Budget, Problem
from allocator.errors import AllocatorError
from allocator.levels import parse_grid
from allocator.search.knapsack import frontier
from tests.conftest import search


def _instance(seed: int, units: int = 5, levels: int = 4, budgets: int = 1) -> Problem:
    rng = np.random.default_rng(seed)
    grid = parse_grid(",".join(f"s0.{i}" for i in range(levels)))
    # cost falls and error rises with the level, with noise: the usual shape, not always monotone
    base = rng.integers(50, 200, size=(units, 1))
    cost = np.maximum(1, base * (levels - np.arange(levels))[None, :] // levels + rng.integers(0, 20, (units, levels)))
    error = np.cumsum(rng.random((units, levels)), axis=1) * rng.random((units, 1)) + 0.1 * rng.random((units, levels))
    limit = float(rng.uniform(cost.min(axis=1).sum(), cost.max(axis=1).sum()))
    extra = []
    for _ in range(budgets - 1):
        c2 = rng.integers(1, 100, size=(units, levels)).astype(float)
        extra.append((Budget("bytes", 1.0), c2, float(rng.uniform(c2.min(axis=1).sum(), c2.max(axis=1).sum()))))
    units_ = [(f"layer{u}",) for u in range(units)]
    budget = Budget("bytes", limit)
    return Problem(units_, grid, cost.astype(float), limit, sensitivity=error, budget=budget, extra=extra)


def _brute_force(problem: Problem) -> float:
    best = np.inf
    for combo in itertools.product(range(len(problem.levels)), repeat=len(problem.units)):
        choice = np.array(combo)
        if problem.feasible(choice):
            best = min(best, problem.sensitivity[np.arange(len(choice)), choice].sum())
    return best


@pytest.mark.parametrize("seed", range(25))
def test_knapsack_equals_brute_force(seed):
    problem = _instance(seed, units=5, levels=4, budgets=1 + seed % 2)
    best = _brute_force(problem)
    if not np.isfinite(best):  # two budgets, each reachable alone, may exclude each other
        with pytest.raises(AllocatorError, match="no solution"):
            search("knapsack", problem, 0)
        return
    choice = search("knapsack", problem, 0).choice
    assert problem.feasible(choice)
    assert problem.sensitivity[np.arange(5), choice].sum() == pytest.approx(best, abs=1e-9)


def test_knapsack_takes_an_exact_fit():
    problem = _instance(0)
    problem = replace(problem, limit=float(problem.cost[:, 2].sum()))  # uniform level 2 fits exactly
    choice = search("knapsack", problem, 0).choice
    assert problem.sensitivity[np.arange(5), choice].sum() <= problem.sensitivity[:, 2].sum() + 1e-12


def test_infeasible_budget_names_the_achievable_range():
    problem = _instance(1)
    problem = replace(problem, limit=float(problem.cost.min(axis=1).sum()) - 1)
    with pytest.raises(AllocatorError, match="out of reach: this grid spans"):
        search("knapsack", problem, 0)


def test_knapsack_needs_errors():
    problem = replace(_instance(2), sensitivity=None)
    with pytest.raises(AllocatorError, match="knapsack needs a sensitivity profile"):
        search("knapsack", problem, 0)
    with pytest.raises(AllocatorError, match="knapsack needs a sensitivity profile"):
        frontier(problem, [problem.limit])


@pytest.mark.parametrize("seed", range(8))
def test_frontier_is_exact_for_integer_costs(seed):
    problem = _instance(seed, units=5, levels=3)
    top = float(problem.cost.max(axis=1).sum())
    limits = [float(x) for x in np.linspace(problem.cost.min(axis=1).sum(), top, 6).round()]
    points = frontier(problem, limits, buckets=int(top))  # one bucket per cost unit: no rounding
    for point in points:
        assert point.cost <= point.limit
        assert point.error == pytest.approx(_brute_force(replace(problem, limit=point.limit)), abs=1e-9)
    assert all(a.error >= b.error - 1e-12 for a, b in zip(points, points[1:], strict=False))


def test_owl_follows_outlier_ratios_and_keeps_budget():
    U = 12
    grid = parse_grid("0:0.9:0.02")
    params = np.full(U, 1000)
    cost = np.array([[lv.kept_params(10, 100) for lv in grid]] * U, dtype=float)
    budget = Budget.parse("sparsity=0.5")
    lod = np.linspace(0.01, 0.05, U)[::-1].copy()  # first units have the most outliers
    problem = Problem([(f"l{u}",) for u in range(U)], grid, cost, 0.5 * params.sum(), budget=budget,
                      params=int(params.sum()), outlier_ratio=lod)  # fmt: skip
    choice = search("owl", problem, 0, lam=0.08).choice
    sparsity = np.array([grid[k].sparsity for k in choice])
    assert problem.feasible(choice)
    assert np.all(np.diff(sparsity) >= -1e-9)  # more outliers, less pruning
    assert sparsity.min() >= 0.5 - 0.08 - 0.02 and sparsity.max() <= 0.5 + 0.08 + 0.02
    assert sparsity.mean() == pytest.approx(0.5, abs=0.02)


def test_owl_refuses_bit_budgets():
    problem = _instance(3)
    with pytest.raises(AllocatorError, match="OWL allocates sparsity"):
        search("owl", problem.with_sensitivity(problem.sensitivity, np.ones(len(problem.units))), 0)


def test_real_valued_limit_met_exactly_is_feasible():
    """speedup=1 on a latency table: the dense plan sits exactly at the limit and every other level is slower."""
    rng = np.random.default_rng(0)
    ms = rng.uniform(0.01, 0.3, size=(6, 1)) * np.array([[1.0, 1.3, 1.7]])  # dense fastest, in milliseconds
    error = np.tile([0.0, 1.0, 2.0], (6, 1))
    problem = Problem([(f"l{u}",) for u in range(6)], parse_grid("dense,w8,w4g32"), ms, float(ms[:, 0].sum()),
                      sensitivity=error, budget=Budget("latency", 1.0))  # fmt: skip
    assert np.array_equal(search("knapsack", problem, 0).choice, np.zeros(6, dtype=int))
