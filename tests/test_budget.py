from __future__ import annotations

import itertools

import numpy as np
import pytest

from allocator.budget import Budget, achieved, build_problem
from allocator.errors import AllocatorError
from allocator.inventory import Inventory
from allocator.levels import parse_grid, parse_level
from tests.conftest import tiny_model


@pytest.mark.parametrize(
    "text,kind,value",
    [
        ("sparsity=0.5", "sparsity", 0.5),
        ("bits=3.5", "bits", 3.5),
        ("BYTES=1e6", "bytes", 1e6),
        ("sparsity=0", "sparsity", 0.0),
    ],
)
def test_parse(text, kind, value):
    assert Budget.parse(text) == Budget(kind, value)


@pytest.mark.parametrize(
    "text", ["sparsity=1", "sparsity=1.2", "sparsity=-0.1", "bits=0", "speed=2", "sparsity", "sparsity=abc"]
)
def test_bad_budgets(text):
    with pytest.raises(AllocatorError, match="sparsity|bits|budget"):
        Budget.parse(text)


def test_achieved_matches_float64_reference():
    inv = Inventory.from_model(tiny_model("llama"))
    rng = np.random.default_rng(0)
    grid = parse_grid("dense,s0.3,s0.7,2:4,w4g32,s0.5+w3")
    assignment = {lay.name: grid[rng.integers(len(grid))] for lay in inv.layers}
    got = achieved(assignment, inv)
    kept = np.float64(0)
    bits = np.float64(0)
    for lay in inv.layers:
        lv = assignment[lay.name]
        nm = lv.prune is not None and lv.prune.nm is not None
        per_row = lay.cols - (lay.cols // 4 * 2 if nm else int(np.ceil(np.float64(lv.sparsity) * lay.cols - 1e-9)))
        kept += lay.rows * per_row
        bits += lv.storage_bits(lay.rows, lay.cols)
    assert got["kept_params"] == kept
    assert got["sparsity"] == pytest.approx(1 - kept / inv.params, abs=1e-15)
    assert got["bits"] == pytest.approx(bits / inv.params, abs=1e-12)


def test_problem_costs_and_tie_groups():
    inv = Inventory.from_model(tiny_model("llama"))
    grid = parse_grid("0:0.9:0.1")
    per_layer = build_problem(inv, grid, Budget.parse("sparsity=0.5"))
    per_group = build_problem(inv, grid, Budget.parse("sparsity=0.5"), per="tie-group")
    assert per_layer.cost.shape == (14, 10) and per_group.cost.shape == (8, 10)
    assert per_layer.cost.sum() == pytest.approx(per_group.cost.sum())
    assert per_layer.limit == 0.5 * inv.params
    choice = np.full(8, 5)
    assignment = per_group.assignment(choice)
    assert len(assignment) == 14 and set(assignment.values()) == {parse_level("s0.5")}
    assert per_group.feasible(choice) and not per_group.feasible(np.full(8, 4))


def test_inapplicable_levels_cost_infinity():
    inv = Inventory.from_model(tiny_model("llama"))
    problem = build_problem(inv, parse_grid("dense,3:7"), Budget.parse("bits=8"))  # 64 cols are not 7-groups
    assert np.isinf(problem.cost[:, 1]).all()
    with pytest.raises(AllocatorError, match="no level of the grid"):
        build_problem(inv, parse_grid("3:7"), Budget.parse("bits=8"))


def test_brute_force_feasibility_is_exact():
    inv = Inventory.from_model(tiny_model("gpt2"))
    grid = parse_grid("dense,s0.5")
    problem = build_problem(inv, grid, Budget.parse("sparsity=0.25"))
    for choice in itertools.product(range(2), repeat=len(problem.units)):
        choice = np.array(choice)
        stats = achieved(problem.assignment(choice), inv)
        assert problem.feasible(choice) == (stats["sparsity"] >= 0.25 - 1e-12)
