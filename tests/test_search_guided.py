"""Guided evolution: finds the optimum an additive model misses, same seed same plan, kill → resume → same plan."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from allocator.budget import Budget, Problem
from allocator.errors import AllocatorError
from allocator.levels import parse_grid
from allocator.search import SearchContext, allocate, make_searcher
from allocator.search.knapsack import Knapsack
from tests.conftest import search

SETTINGS = dict(start="knapsack", generations=30, offspring=6, screen=4, stages="2@128,1@512")


def interacting_problem() -> Problem:
    """Six units, four sparsity levels; the profile is additive, but units 0 and 1 pruned hard together cost more."""
    rng = np.random.default_rng(4)
    frac = np.array([1.0, 0.7, 0.4, 0.1])
    sizes = rng.integers(200, 400, size=(6, 1)).astype(float)
    cost = sizes * frac[None, :]
    limit = float(cost[:, 1:3].mean(axis=1).sum())
    grid = parse_grid("s0.0,s0.3,s0.6,s0.9")
    problem = Problem([(f"u{u}",) for u in range(6)], grid, cost, limit, budget=Budget("bytes", limit))
    weight = rng.uniform(0.5, 1.5, size=(6, 1))
    weight[:2] = 0.1  # the profile calls units 0 and 1 nearly free to prune
    return problem.with_sensitivity(weight * (1 - frac[None, :]) ** 2)


class InteractingFitness:
    """The profile plus a penalty when units 0 and 1 are both at 60 % or more, and a batch-dependent wobble."""

    pool_size, seq_len = 16, 64

    def __init__(self, problem: Problem, fail_after: int | None = None):
        self.problem, self.calls, self.fail_after = problem, 0, fail_after

    def set_parent(self, choice):
        pass

    def exact(self, choice) -> float:
        additive = self.problem.total_sensitivity(np.asarray(choice))
        return additive + (2.0 if choice[0] >= 2 and choice[1] >= 2 else 0.0)

    def __call__(self, choice, batch):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # the search is killed mid-generation
        return self.exact(choice) + 1e-3 * np.sin(np.asarray(batch).sum())


def brute_force(problem: Problem, score) -> np.ndarray:
    rows = np.arange(len(problem.units))
    plans = (np.array(c) for c in itertools.product(range(len(problem.levels)), repeat=len(rows)))
    feasible = [c for c in plans if problem.cost[rows, c].sum() <= problem.limit]
    return min(feasible, key=score)


def test_guided_finds_the_optimum_the_additive_model_misses():
    problem = interacting_problem()
    fitness = InteractingFitness(problem)
    truth = brute_force(problem, fitness.exact)
    start = Knapsack().search(problem).choice
    assert np.array_equal(start, brute_force(problem, problem.total_sensitivity))  # the additive optimum...
    assert fitness.exact(start) > fitness.exact(truth) + 1.0  # ...pays the interaction
    parents = []
    observe = lambda record, parent: parents.append(parent.copy())  # noqa: E731
    found = allocate(problem, make_searcher("guided", **SETTINGS), SearchContext(0, fitness, observer=observe))
    assert problem.feasible(found.choice)
    assert fitness.exact(found.choice) == pytest.approx(fitness.exact(truth), abs=1e-12)
    exact = [fitness.exact(p) for p in parents]  # the wobble is shared by plans on the same windows: never worse
    assert all(a >= b for a, b in zip([fitness.exact(start), *exact], exact, strict=False))
    assert len(parents) == SETTINGS["generations"]


def test_same_seed_same_plan_and_history():
    problem = interacting_problem()
    a = search("guided", problem, 5, InteractingFitness(problem), **SETTINGS)
    b = search("guided", problem, 5, InteractingFitness(problem), **SETTINGS)
    assert np.array_equal(a.choice, b.choice)
    strip = [{k: v for k, v in h.items() if k != "time_s"} for h in a.history]
    assert strip == [{k: v for k, v in h.items() if k != "time_s"} for h in b.history]


def test_kill_and_resume_give_the_same_plan(tmp_path):
    problem = interacting_problem()
    straight = search("guided", problem, 2, InteractingFitness(problem), **SETTINGS)
    with pytest.raises(KeyboardInterrupt):
        search("guided", problem, 2, InteractingFitness(problem, fail_after=60), tmp_path, **SETTINGS)
    assert [p.name for p in tmp_path.iterdir()] == ["guided_state.json"]
    resumed = search("guided", problem, 2, InteractingFitness(problem), tmp_path, resume=True, **SETTINGS)
    assert np.array_equal(straight.choice, resumed.choice)
    assert [h["tokens"] for h in resumed.history] == [h["tokens"] for h in straight.history]
    with pytest.raises(AllocatorError, match="another search"):
        search("guided", problem, 3, InteractingFitness(problem), tmp_path, resume=True, **SETTINGS)


def test_shares_the_plans_the_fitted_search_measured():
    """Plans handed in through the context (measured on shared windows) are differences the surrogate fits from
    the first generation."""
    problem = interacting_problem()
    fitness = InteractingFitness(problem)
    rng = np.random.default_rng(0)
    rows = np.arange(6)
    known = []
    while len(known) < 12:
        c = rng.integers(0, 4, size=6)
        if problem.cost[rows, c].sum() <= problem.limit:
            known.append((c.tolist(), fitness.exact(c)))
    found = allocate(problem, make_searcher("guided", **{**SETTINGS, "generations": 1}),
                     SearchContext(0, fitness, measured=tuple(known)))  # fmt: skip
    assert found.history[0]["pairs"] > 11 and found.history[0]["surrogate_r2"] is not None  # 11 among the 12


def test_guided_run_end_to_end_shares_the_fitted_history(tiny_model_dir, text_files, tmp_path):
    """Through the CLI: the knapsack start's fitted search measured plans on the same windows; guided reuses them."""
    import pandas as pd

    from allocator.cli import main
    from allocator.plan import Plan
    from tests.test_profile import _args

    out = tmp_path / "guided"
    argv = _args(tiny_model_dir, text_files, tmp_path, "--method", "guided", "--start", "knapsack",
                 "--generations", "2", "--offspring", "3", "--target", "sparsity=0.5", "--sensitivity", "fitted", "-o",
                 str(out))  # fmt: skip
    assert main(argv) == 0
    assert {"guided_state.json", "fitted_state.json", "history.csv", "plan.json"} <= {p.name for p in out.iterdir()}
    fitted = len(json.loads((out / "sensitivity.json").read_text())["choices"])
    history = pd.read_csv(out / "history.csv")
    assert len(history) == 2 and history["pairs"].iloc[0] > fitted - 1  # the fitted plans' pairs, plus this search's
    assert history["surrogate_r2"].notna().all()
    assert Plan.load(out / "plan.json").achieved["sparsity"] >= 0.5 - 1e-12
