"""Evolution: budget-keeping mutation (property test), determinism, resume, incremental = full fitness."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from allocator.budget import Budget, Problem
from allocator.errors import AllocatorError
from allocator.levels import parse_grid
from allocator.search.evolution import mutate
from allocator.search.repair import level_ladders
from tests.conftest import ToyFitness, search, toy_problem


def _random_problem(seed: int, budgets: int = 1) -> Problem:
    rng = np.random.default_rng(seed)
    U, K = int(rng.integers(3, 12)), int(rng.integers(2, 7))
    sizes = rng.integers(10, 1000, size=(U, 1)).astype(float)
    frac = np.sort(rng.random(K))[::-1]
    cost = sizes * frac[None, :]
    cost[rng.random((U, K)) < 0.1] = np.inf  # some levels do not apply to some units
    cost[:, 0] = sizes[:, 0]
    limit = float(rng.uniform(np.nanmin(np.where(np.isinf(cost), np.nan, cost), axis=1).sum(), sizes.sum()))
    extra = []
    for _ in range(budgets - 1):
        c2 = cost * rng.uniform(0.5, 1.5, size=(U, 1))
        extra.append((Budget("bytes", 1.0), c2, float(np.nanmax(np.where(np.isinf(c2), np.nan, c2), axis=1).sum())))
    return Problem([(f"u{u}",) for u in range(U)], parse_grid(",".join(f"s0.{k}" for k in range(K))), cost, limit,
                   budget=Budget("bytes", limit), extra=extra)  # fmt: skip


@pytest.mark.parametrize("seed", range(40))
def test_mutation_never_breaks_the_budget(seed):
    problem = _random_problem(seed, budgets=1 + seed % 2)
    ladders = level_ladders(problem)
    rng = np.random.default_rng(seed)
    # start from the cheapest choice (always feasible), then mutate repeatedly
    parent = np.array([ladder[-1] for ladder in ladders])
    assert problem.feasible(parent)
    for _ in range(30):
        child = mutate(problem, parent, ladders, rng)
        if child is None:
            continue
        assert problem.feasible(child)
        assert np.isfinite(problem.cost[np.arange(len(child)), child]).all()
        parent = child


def test_same_seed_same_plan_and_better_than_start():
    problem = toy_problem()
    plans = []
    for _ in range(2):
        evo = search("evolution", problem, 3, ToyFitness(problem), generations=15, offspring=6, stages="3@64,1@256")
        plans.append(evo.choice)
    assert np.array_equal(plans[0], plans[1])
    assert problem.feasible(plans[0])
    uniform = search("uniform", problem).choice
    rows = np.arange(len(uniform))
    assert problem.sensitivity[rows, plans[0]].sum() < problem.sensitivity[rows, uniform].sum()
    history = evo.history
    assert [h["generation"] for h in history] == list(range(1, 16))
    assert all(a["fitness"] >= b["fitness"] - 0.02 for a, b in zip(history, history[1:], strict=False))


def test_probe_tracks_the_parent_without_changing_the_search():
    """The probe (a fixed yardstick for convergence plots) must not touch the RNG, the plan or the counters."""
    problem = toy_problem()
    plans, histories = [], []
    for probe in (0, 4):
        fitness = ToyFitness(problem)
        fitness.counters = {"block_forwards": 0}
        evo = search("evolution", problem, 5, fitness, generations=8, offspring=4, stages="1@128", probe=probe)
        plans.append(evo.choice)
        histories.append(evo.history)
    assert np.array_equal(plans[0], plans[1])
    plain, probed = histories
    assert probed[0]["generation"] == 0 and len(probed) == len(plain) + 1
    assert [h["block_forwards"] for h in probed[1:]] == [h["block_forwards"] for h in plain]
    final = ToyFitness(problem)(plans[1], np.arange(4))
    assert probed[-1]["parent_kl"] == pytest.approx(final)


def test_resume_after_interruption_gives_the_same_plan(tmp_path):
    problem = toy_problem()
    settings = dict(generations=12, offspring=5, stages="2@64,1@128")
    straight = search("evolution", problem, 7, ToyFitness(problem), **settings).choice
    ckpt = tmp_path / "evolution_state.json"
    with pytest.raises(KeyboardInterrupt):  # the fitness dies during generation 6
        search("evolution", problem, 7, ToyFitness(problem, fail_after=40), tmp_path, **settings)
    assert ckpt.is_file() and [p.name for p in tmp_path.iterdir()] == [ckpt.name]
    resumed = search("evolution", problem, 7, ToyFitness(problem), tmp_path, resume=True, **settings).choice
    assert np.array_equal(straight, resumed)
    with pytest.raises(AllocatorError, match="another search"):
        search("evolution", problem, 8, ToyFitness(problem), tmp_path, resume=True, **settings)


def test_counters_continue_on_resume(tmp_path):
    """history's block-forward counters after a kill and resume equal an uninterrupted run's."""
    problem = toy_problem()
    settings = dict(generations=8, offspring=4, stages="2@64,1@128")

    def counted(**kw):
        fitness = ToyFitness(problem, **kw)
        fitness.counters = {"block_forwards": 0}
        return fitness

    straight = search("evolution", problem, 3, counted(), **settings)
    with pytest.raises(KeyboardInterrupt):
        search("evolution", problem, 3, counted(fail_after=25), tmp_path, **settings)
    resumed = search("evolution", problem, 3, counted(), tmp_path, resume=True, **settings)
    assert [h["block_forwards"] for h in resumed.history] == [h["block_forwards"] for h in straight.history]


def test_knapsack_start_needs_a_profile():
    problem = replace(toy_problem(), sensitivity=None)
    with pytest.raises(AllocatorError, match="evolution needs a sensitivity profile"):
        search("evolution", problem, 0, ToyFitness(problem), start="knapsack", generations=1)


EVOLVE = """
import sys, time
from pathlib import Path
from tests.conftest import ToyFitness, toy_problem
from tests.test_search_evolution import KILL_SETTINGS
from allocator.search import SearchContext, make_searcher

class Slow(ToyFitness):
    def __call__(self, choice, batch):
        Path(sys.argv[2]).touch()  # the search is running
        time.sleep(0.004)
        return super().__call__(choice, batch)

problem = toy_problem()
make_searcher("evolution", **KILL_SETTINGS).search(problem, SearchContext(11, Slow(problem), Path(sys.argv[1])))
"""
KILL_SETTINGS = dict(generations=12, offspring=5, stages="2@64,1@128")


@pytest.fixture(scope="module")
def straight_plan() -> np.ndarray:
    problem = toy_problem()
    return search("evolution", problem, 11, ToyFitness(problem), **KILL_SETTINGS).choice


@pytest.mark.parametrize("generation", [0, 5, 10])
def test_kill_9_then_resume_gives_the_uninterrupted_plan(tmp_path, generation, straight_plan):
    """A real kill -9 (no handler runs) before the first checkpoint, mid-run and near the end."""
    ckpt = tmp_path / "evolution_state.json"
    root = Path(__file__).resolve().parents[1]
    running = tmp_path.parent / f"{tmp_path.name}.running"
    worker = subprocess.Popen([sys.executable, "-c", EVOLVE, str(tmp_path), str(running)], cwd=root)
    deadline = time.time() + 120
    while time.time() < deadline and worker.poll() is None:
        time.sleep(0.01)
        if generation == 0 and running.is_file():
            break
        if ckpt.is_file() and json.loads(ckpt.read_text())["generation"] >= generation > 0:
            break
    assert worker.poll() is None, "the search ended before the kill"
    worker.kill()
    worker.wait()
    saved = json.loads(ckpt.read_text())["generation"] if ckpt.is_file() else 0
    assert generation <= saved < KILL_SETTINGS["generations"]
    problem = toy_problem()
    resumed = search("evolution", problem, 11, ToyFitness(problem), tmp_path, resume=True, **KILL_SETTINGS).choice
    assert np.array_equal(resumed, straight_plan)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.name]  # no temporary file left
