from __future__ import annotations

import numpy as np
import pytest

from allocator.errors import AllocatorError
from allocator.inventory import Inventory
from allocator.levels import DEFAULT_GRID, Level, parse_grid, parse_level
from tests.conftest import search

NAMES = ["dense", "s0.5", "s0.1", "2:4", "4:8", "w4g128", "w3", "w2g64a", "s0.5+w4g128", "2:4+w8", "drop"]


@pytest.mark.parametrize("name", NAMES)
def test_names_round_trip(name):
    assert parse_level(name).name == name


def test_parts_fill_slots():
    slots = [
        tuple(type(p).kind for p in parse_level(n).parts) for n in ["dense", "s0.3", "2:4", "w4", "s0.5+w4", "drop"]
    ]
    assert slots == [(), ("sparsity",), ("nm",), ("int",), ("sparsity", "int"), ("drop",)]
    level = parse_level("w4g128+s0.5")  # written in any order, named in slot order
    assert level.name == "s0.5+w4g128" and level.prune.sparsity == 0.5 and level.weights.group == 128


@pytest.mark.parametrize("bad", ["s0.5+2:4", "w4+w8", "drop+w4", "q4_K+s0.5"])
def test_parts_that_do_not_combine_are_one_line_errors(bad):
    with pytest.raises(AllocatorError, match=r"two prune|two weights|combines with no other"):
        parse_level(bad)


def test_default_grid_is_ten_sparsity_levels():
    grid = parse_grid(DEFAULT_GRID)
    assert [lv.name for lv in grid] == ["dense"] + [f"s0.{i}" for i in range(1, 10)]


@pytest.mark.parametrize("s", [0.1, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("cols", [576, 1536, 7, 100])
def test_sparsity_never_misses_its_target(s, cols):
    level = parse_level(f"s{s}")
    kept = level.kept_params(3, cols)
    assert kept <= (1 - s) * 3 * cols + 1e-9
    assert kept > (1 - s) * 3 * cols - 3  # at most one weight per row over-pruned


def test_storage_bits_by_hand():
    rows, cols = 8, 256
    assert Level().storage_bits(rows, cols) == rows * cols * 16
    # unstructured 50%: kept fp16 values + 1-bit mask
    assert parse_level("s0.5").storage_bits(rows, cols) == rows * 128 * 16 + rows * cols
    # 2:4: kept values + 2-bit index per kept value
    assert parse_level("2:4").storage_bits(rows, cols) == rows * 128 * (16 + 2)
    # w4g128 symmetric: 4-bit codes + one fp16 scale per (row, group)
    assert parse_level("w4g128").storage_bits(rows, cols) == rows * cols * 4 + rows * 2 * 16
    # w3 asymmetric per-channel: codes + scale and 3-bit zero per row
    assert parse_level("w3a").storage_bits(rows, cols) == rows * cols * 3 + rows * (16 + 3)
    assert parse_level("drop").storage_bits(rows, cols) == 0


def test_applies_to_checks_divisibility():
    assert parse_level("2:4").unfit_reason(4, 6) is not None
    assert parse_level("w4g128").unfit_reason(4, 200) is None  # shorter last group, counted in the cost
    assert parse_level("s0.5").unfit_reason(4, 7) is None


@pytest.mark.parametrize("bad", ["s1.5", "4:2", "w1", "w9", "q4", "", "s"])
def test_bad_levels_are_clear_errors(bad):
    with pytest.raises(AllocatorError, match="level|grid"):
        parse_grid(bad) if bad == "" else parse_level(bad)


def test_gguf_types_are_levels_priced_as_llama_cpp_stores_them():
    """``--levels gguf``: each type's bits from gguf-py's block sizes; a k-quant is unfit where llama-quantize
    would fall back (its 256-weight block does not divide the row), so a plan never asks for a fallback."""
    import gguf

    grid = parse_grid("gguf")
    assert grid[0].name == "dense" and {type(lv.weights).kind for lv in grid[1:]} == {"gguf"}
    assert {lv.format for lv in grid[1:]} == {"llamacpp"} and parse_level("q4_K@llamacpp") == parse_level("q4_K")
    for lv in grid[1:]:
        assert parse_level(lv.name) == lv and parse_level(lv.name.upper()) == lv
        size, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[lv.name.upper()]]
        assert lv.storage_bits(3, 1536) == 3 * 1536 // size * nbytes * 8
        assert (lv.unfit_reason(3, 576) is None) == (576 % size == 0)
    assert parse_level("q4_K") != parse_level("w4g32a")  # same simulation, another storage
    assert parse_level("q4_K").storage_bits(1, 256) == 144 * 8


def test_a_gguf_grid_gives_uniform_a_type_every_layer_can_take():
    from allocator.budget import Budget, build_problem
    from allocator.inventory import Layer

    layers = (Layer("a.0.q", 0, "q", 576, 576), Layer("a.0.down", 0, "down", 576, 1536))
    inv = Inventory(layers, (("a.0.q",), ("a.0.down",)), "a", 1)
    problem = build_problem(inv, parse_grid("gguf"), Budget.parse("bits=4.5"))
    names = [lv.name for lv in problem.levels]
    assert np.isinf(problem.cost[0, names.index("q4_K")]) and np.isfinite(problem.cost[1, names.index("q4_K")])
    assert {problem.levels[k].name for k in search("uniform", problem).choice} == {"q4_0"}
