"""Optuna search: budgets held by every trial, determinism, seeding, resume, shared storage, Pareto fronts."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest

from allocator.budget import Budget, Problem
from allocator.errors import AllocatorError
from allocator.levels import parse_grid
from allocator.search import get_searcher
from allocator.search.bayesian import open_storage, project
from tests.test_search_evolution import ToyFitness, _toy_problem

ROOT = Path(__file__).resolve().parents[1]


class SlowToyFitness(ToyFitness):
    """The toy fitness, slow enough that two workers interleave (or that a kill lands inside a trial)."""

    def __init__(self, problem: Problem, delay: float = 0.01):
        super().__init__(problem)
        self.delay = delay

    def __call__(self, choice, batch):
        time.sleep(self.delay)
        return super().__call__(choice, batch)


def _trials(storage: str, name: str = "allocator") -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=open_storage(storage)).trials


def test_every_trial_meets_the_budget_and_beats_no_seed():
    problem = _toy_problem()
    problem.fitness = ToyFitness(problem)
    searcher = get_searcher("optuna", trials=25, storage=None)
    best = searcher.search(problem, seed=0)
    assert problem.feasible(best)
    assert len(searcher.history) == 25
    for h in searcher.history:
        assert np.isfinite(h["fitness"])
    # the seeds were queued first and evaluated as they are; the best is at least as good as every seed
    seeded = {h["seed"]: h["fitness"] for h in searcher.history if h["seed"]}
    assert set(seeded) == {"uniform", "knapsack"}  # OWL needs outlier ratios, which the toy lacks
    best_fit = ToyFitness(problem)(best, np.arange(8))
    assert best_fit <= min(seeded.values()) + 1e-12


def test_trial_plans_recorded_for_the_dashboard_hold_the_budget(tmp_path):
    problem = _toy_problem()
    problem.fitness = ToyFitness(problem)
    storage = str(tmp_path / "study.journal")
    get_searcher("optuna", trials=15, storage=storage).search(problem, seed=1)
    names = [lv.name for lv in problem.levels]
    trials = _trials(storage)
    assert len(trials) == 15
    for t in trials:
        choice = np.array([names.index(n) for n in t.user_attrs["plan"]])
        assert problem.feasible(choice)
        assert t.user_attrs["budget"] == "sparsity=0.5" and t.user_attrs["seconds"] >= 0
        assert all(v <= 1e-6 for v in t.system_attrs.get("constraints", [0.0]))


@pytest.mark.parametrize("space", ["levels", "compact"])
def test_same_seed_same_best_plan(space):
    problem = _toy_problem()
    plans = []
    for _ in range(2):
        problem.fitness = ToyFitness(problem)
        plans.append(get_searcher("optuna", space=space, trials=12).search(problem, seed=4))
    assert np.array_equal(*plans)


def test_project_meets_the_budget_and_leaves_feasible_plans_alone():
    problem = _toy_problem()
    rng = np.random.default_rng(0)
    for _ in range(20):
        proposal = rng.integers(0, len(problem.levels), size=len(problem.units))
        fixed = project(problem, proposal)
        assert problem.feasible(fixed)
        if problem.feasible(proposal):
            assert np.array_equal(project(problem, proposal, fill=False), proposal)


def test_project_fill_is_never_worse_than_down_only():
    problem = _toy_problem()
    rows = np.arange(len(problem.units))
    rng = np.random.default_rng(1)
    for _ in range(20):
        proposal = rng.integers(0, len(problem.levels), size=len(problem.units))
        down, filled = project(problem, proposal, fill=False), project(problem, proposal)
        assert problem.error[rows, filled].sum() <= problem.error[rows, down].sum() + 1e-12


def test_resume_continues_the_same_study(tmp_path):
    storage = str(tmp_path / "study.journal")
    worker = subprocess.Popen([sys.executable, "-c", WORKER, storage, "10", "0", "0.3"], cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline:  # kill -9 once 5 trials are done: the 6th is left RUNNING
        time.sleep(0.05)
        if Path(storage).is_file() and sum(t.state.is_finished() for t in _trials(storage)) >= 5:
            break
    worker.kill()
    worker.wait()
    before = _trials(storage)
    finished = {t.number: t.params for t in before if t.state == optuna.trial.TrialState.COMPLETE}
    running = [t for t in before if t.state == optuna.trial.TrialState.RUNNING]
    assert 5 <= len(finished) < 10 and len(running) == 1
    problem = _toy_problem()
    problem.fitness = SlowToyFitness(problem)
    get_searcher("optuna", trials=10, storage=storage, resume=True).search(problem, seed=0)
    after = _trials(storage)
    complete = [t for t in after if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 10
    assert {t.number: t.params for t in complete if t.number in finished} == finished  # nothing redone
    # re-queued, not lost: the kill may land while parameters are still being suggested (a partial set)
    assert any(running[0].params.items() <= t.params.items() and t.number > running[0].number for t in complete)
    assert not [t for t in after if t.state == optuna.trial.TrialState.RUNNING]


def test_a_study_for_another_search_is_refused(tmp_path):
    problem = _toy_problem()
    problem.fitness = ToyFitness(problem)
    storage = str(tmp_path / "study.journal")
    get_searcher("optuna", trials=3, storage=storage).search(problem, seed=0)
    with pytest.raises(AllocatorError, match="another search"):
        get_searcher("optuna", trials=3, storage=storage, space="compact").search(problem, seed=0)


WORKER = """
import sys
from tests.test_search_optuna import SlowToyFitness, _toy_problem
from allocator.search import get_searcher
problem = _toy_problem()
problem.fitness = SlowToyFitness(problem, delay=float(sys.argv[4]) if len(sys.argv) > 4 else 0.01)
get_searcher("optuna", trials=int(sys.argv[2]), storage=sys.argv[1]).search(problem, seed=int(sys.argv[3]))
"""


@pytest.mark.parametrize("kind", ["journal", "sqlite"])
def test_two_workers_share_one_study(tmp_path, kind):
    storage = str(tmp_path / "study.journal") if kind == "journal" else f"sqlite:///{tmp_path / 'study.db'}"
    # the study (and its seeds) exists before the workers join, as when a first run is extended
    problem = _toy_problem()
    problem.fitness = ToyFitness(problem)
    get_searcher("optuna", trials=2, storage=storage).search(problem, seed=0)
    n = 24
    workers = [subprocess.Popen([sys.executable, "-c", WORKER, storage, str(n), str(seed)], cwd=ROOT,
                                stderr=subprocess.PIPE, text=True) for seed in (1, 2)]  # fmt: skip
    errors = [w.communicate(timeout=300)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    trials = _trials(storage)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == n  # exactly the quota between them: none lost, none extra
    numbers = [t.number for t in trials]
    assert len(set(numbers)) == len(numbers)
    assert not [t for t in trials if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL)]
    assert {t.number for t in complete} == set(range(n))  # pruned extras only beyond the quota
    names = [lv.name for lv in problem.levels]
    assert all(problem.feasible(np.array([names.index(x) for x in t.user_attrs["plan"]])) for t in complete)


def test_pareto_front_is_not_dominated():
    problem = _toy_problem()
    problem.fitness = ToyFitness(problem)
    searcher = get_searcher("optuna", sampler="nsga2", trials=40, objectives="fitness,bytes")
    searcher.search(problem, seed=0)
    front = [(p["fitness"], p["bytes"]) for p in searcher.pareto]
    every = [(h["fitness"], h["bytes"]) for h in searcher.history]
    assert len(front) >= 2
    for f, b in front:
        assert not any(f2 <= f and b2 <= b and (f2 < f or b2 < b) for f2, b2 in every)
    for p in searcher.pareto:
        assert problem.feasible(p["choice"])
    assert len({p["choice"].tobytes() for p in searcher.pareto}) == len(searcher.pareto)  # no plan twice


def test_brute_force_small_problem_found_by_levels_space():
    """On a 3-unit problem with 4 levels the study (64 trials > 4^3 plans) must reach the true optimum."""
    grid = parse_grid("0:0.9:0.3")
    sizes = np.array([[100.0], [300.0], [200.0]])
    cost = sizes * (1 - np.array([lv.sparsity for lv in grid]))[None, :]
    error = np.array([[0.0, 1.0, 3.0, 9.0], [0.0, 0.5, 2.0, 4.0], [0.0, 2.0, 5.0, 7.0]])
    problem = Problem([("a.0.x",), ("a.1.x",), ("a.2.x",)], grid, cost, 330.0, error=error,
                      budget=Budget("bytes", 330.0))  # fmt: skip
    best_brute = min((error[np.arange(3), c].sum(), c) for c in itertools.product(range(4), repeat=3)
                     if problem.feasible(np.array(c)))  # fmt: skip
    found = get_searcher("optuna", trials=64).search(problem, seed=0)
    assert error[np.arange(3), found].sum() == pytest.approx(best_brute[0])


def test_bad_settings_are_refused():
    problem = _toy_problem()
    problem.fitness = ToyFitness(problem)
    with pytest.raises(AllocatorError, match="continuous"):
        get_searcher("optuna", sampler="cmaes").search(problem, seed=0)
    with pytest.raises(AllocatorError, match="unknown sampler"):
        get_searcher("optuna", sampler="random").search(problem, seed=0)
    problem.error = None
    with pytest.raises(AllocatorError, match="profile"):
        get_searcher("optuna", space="compact").search(problem, seed=0)
