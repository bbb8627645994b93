from __future__ import annotations

import json

import numpy as np
import pytest

from allocator.budget import Budget, build_problem
from allocator.errors import AllocatorError
from allocator.inventory import Inventory
from allocator.levels import parse_grid, parse_level
from allocator.plan import Plan
from tests.conftest import search, tiny_model


def _plan(family: str = "llama") -> tuple[Plan, Inventory]:
    inv = Inventory.from_model(tiny_model(family))
    grid = parse_grid("0:0.9:0.1")
    budget = Budget.parse("sparsity=0.5")
    problem = build_problem(inv, grid, budget)
    choice = search("uniform", problem, 0).choice
    return Plan.create(problem.assignment(choice), inv, family, budget, grid, "uniform", 0), inv


def test_save_load_round_trip(tmp_path):
    plan, inv = _plan()
    plan.save(tmp_path / "plan.json")
    loaded = Plan.load(tmp_path / "plan.json", inv)
    assert loaded.assignment == plan.assignment
    assert loaded.budget == plan.budget and loaded.grid == plan.grid
    assert loaded.achieved["sparsity"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "plan.json").read_text())["schema_version"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]  # no temporary file left


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_plan_records_each_layers_block_and_role(tmp_path, family):
    """Exporters and plots read blocks from the plan; plans saved before it was recorded get them from names."""
    plan, inv = _plan(family)
    plan.save(tmp_path / "plan.json")
    expected = {lay.name: (lay.block, lay.role) for lay in inv.layers}
    assert Plan.load(tmp_path / "plan.json").layers == expected
    old = json.loads((tmp_path / "plan.json").read_text())
    del old["model"]["layers"]
    derived = Plan.from_dict(old).layers
    assert {n: w for n, w in derived.items() if w[1] != "lm_head"} == {
        n: w for n, w in expected.items() if w[1] != "lm_head"
    }


def test_plan_for_another_model_is_refused(tmp_path):
    plan, _ = _plan("llama")
    plan.save(tmp_path / "plan.json")
    other = Inventory.from_model(tiny_model("qwen3"))  # same layer names, other shapes
    with pytest.raises(AllocatorError, match="another model"):
        Plan.load(tmp_path / "plan.json", other)
    with pytest.raises(AllocatorError, match="does not have"):
        Plan.load(tmp_path / "plan.json", Inventory.from_model(tiny_model("gpt2")))


def test_unknown_layer_and_off_grid_level(tmp_path):
    plan, inv = _plan()
    data = plan.to_dict()
    data["assignment"]["model.layers.9.mlp.up_proj"] = "s0.5"
    (tmp_path / "a.json").write_text(json.dumps(data))
    with pytest.raises(AllocatorError, match="layers of assignment and model.shapes differ"):
        Plan.load(tmp_path / "a.json", inv)
    data = plan.to_dict()
    data["assignment"]["model.layers.0.mlp.up_proj"] = "s0.55"
    (tmp_path / "b.json").write_text(json.dumps(data))
    with pytest.raises(AllocatorError, match="outside the plan's grid"):
        Plan.load(tmp_path / "b.json")


@pytest.mark.parametrize(
    "content,match",
    [
        ("{not json", "not valid JSON"),
        ("[]", "schema_version"),
        ('{"schema_version": 1}', "malformed"),
        ('{"schema_version": 99}', "schema_version"),
    ],
)
def test_corrupt_plan_files(tmp_path, content, match):
    (tmp_path / "p.json").write_text(content)
    with pytest.raises(AllocatorError, match=match):
        Plan.load(tmp_path / "p.json")


def test_missing_plan_file(tmp_path):
    with pytest.raises(AllocatorError, match="does not exist"):
        Plan.load(tmp_path / "none.json")


def test_create_refuses_a_level_that_cannot_apply():
    inv = Inventory.from_model(tiny_model("llama"))
    grid = [parse_level("3:7")]
    assignment = {lay.name: grid[0] for lay in inv.layers}
    with pytest.raises(AllocatorError, match="cannot apply"):
        Plan.create(assignment, inv, "m", Budget.parse("bits=8"), grid, "uniform", 0)


def test_tie_group_plan_gives_groups_one_level():
    inv = Inventory.from_model(tiny_model("llama"))
    problem = build_problem(inv, parse_grid("0:0.9:0.1"), Budget.parse("sparsity=0.3"), per="tie-group")
    choice = np.arange(len(problem.units)) % 10
    assignment = problem.assignment(choice)
    for group in inv.groups:
        assert len({assignment[n] for n in group}) == 1
