from __future__ import annotations

import numpy as np
import pytest

from allocator.budget import Budget, achieved, build_problem
from allocator.errors import AllocatorError
from allocator.inventory import Inventory
from allocator.levels import parse_grid
from allocator.search import make_searcher
from tests.conftest import search, tiny_model


@pytest.mark.parametrize(
    "target,expect",
    [("sparsity=0.5", "s0.5"), ("sparsity=0.55", "s0.6"), ("sparsity=0", "dense"), ("sparsity=0.9", "s0.9")],
)
def test_uniform_picks_least_compressed_level_within_budget(target, expect):
    inv = Inventory.from_model(tiny_model("llama"))
    problem = build_problem(inv, parse_grid("0:0.9:0.1"), Budget.parse(target))
    choice = search("uniform", problem, 0).choice
    assert {problem.levels[k].name for k in choice} == {expect}
    assert achieved(problem.assignment(choice), inv)["sparsity"] >= Budget.parse(target).value - 1e-12


def test_uniform_over_bits_budget():
    inv = Inventory.from_model(tiny_model("llama"))
    problem = build_problem(inv, parse_grid("dense,w8,w4,w3,w2"), Budget.parse("bits=4.5"))
    choice = search("uniform", problem, 0).choice
    assert {problem.levels[k].name for k in choice} == {"w4"}


def test_infeasible_budget_names_the_achievable_range():
    inv = Inventory.from_model(tiny_model("llama"))
    problem = build_problem(inv, parse_grid("0:0.5:0.1"), Budget.parse("sparsity=0.8"))
    with pytest.raises(AllocatorError, match=r"out of reach: this grid spans sparsity 0.0000 to sparsity 0.5000"):
        search("uniform", problem, 0)


def test_unknown_method_and_options():
    with pytest.raises(AllocatorError, match="unknown method 'nope'"):
        make_searcher("nope")
    with pytest.raises(AllocatorError, match=r"unknown search options \['generation'\]"):
        make_searcher("uniform", {"generation": 3})
    with pytest.raises(AllocatorError, match=r"uniform has no option \['lam'\]"):
        make_searcher("uniform", lam=0.1)
    assert make_searcher("owl", {"lam": 0.2, "generations": 3}).lam == 0.2  # other methods' options are ignored


def test_same_seed_same_plan():
    inv = Inventory.from_model(tiny_model("gpt2"))
    problem = build_problem(inv, parse_grid("0:0.9:0.1"), Budget.parse("sparsity=0.7"), per="tie-group")
    a, b = (search("uniform", problem, s).choice for s in (0, 0))
    assert np.array_equal(a, b)
