from __future__ import annotations

import pytest
import torch

from allocator.backends import apply_, get_backend
from allocator.backends.magnitude import magnitude_prune
from allocator.backends.masks import prune_mask
from allocator.errors import AllocatorError
from allocator.inventory import Inventory, weight_view
from allocator.levels import parse_level
from tests.conftest import tiny_model


@pytest.mark.parametrize("s", [0.1, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("per_row", [False, True])
def test_unstructured_mask_has_exact_density(s, per_row):
    score = torch.randn(24, 37)
    level = parse_level(f"s{s}")
    mask = prune_mask(score, level, per_row)
    assert int(mask.sum()) == 24 * level.pruned_per_row(37)
    if per_row:
        assert (mask.sum(1) == level.pruned_per_row(37)).all()
    # everything removed scores no higher than everything kept (per comparison group)
    if per_row:
        assert (score.masked_fill(~mask, -1e9).max(1).values <= score.masked_fill(mask, 1e9).min(1).values).all()
    else:
        assert score[mask].max() <= score[~mask].min()


@pytest.mark.parametrize("nm", ["2:4", "4:8", "1:4"])
def test_nm_mask_is_valid(nm):
    level = parse_level(nm)
    score = torch.randn(16, 64)
    mask = prune_mask(score, level, per_row=True)
    n, m = level.prune.nm
    groups = (~mask).view(16, -1, m).sum(-1)
    assert (groups == n).all()


def test_magnitude_removes_smallest_weights_exactly():
    W = torch.randn(32, 48, dtype=torch.float64)
    out = magnitude_prune(W, parse_level("s0.5"))
    zero = out == 0
    assert int(zero.sum()) == 32 * 24
    assert W.abs()[zero].max() <= W.abs()[~zero].min()
    assert torch.equal(out[~zero], W[~zero])  # survivors untouched


def test_apply_in_place_on_every_family(family_model):
    _, model = family_model
    inv = Inventory.from_model(model)
    assignment = {lay.name: parse_level("s0.7") for lay in inv.layers}
    assignment[inv.layers[0].name] = parse_level("dense")
    before = weight_view(model.get_submodule(inv.layers[0].name)).clone()
    apply_(model, assignment, "magnitude")
    assert torch.equal(weight_view(model.get_submodule(inv.layers[0].name)), before)
    for lay in inv.layers[1:]:
        W = weight_view(model.get_submodule(lay.name))
        assert int((W != 0).sum()) == parse_level("s0.7").kept_params(lay.rows, lay.cols)


def test_drop_zeroes_the_layer():
    model = tiny_model("gpt2")
    name = "transformer.h.0.mlp.c_proj"
    apply_(model, {name: parse_level("drop")}, "magnitude")
    assert not model.get_submodule(name).weight.any() and not model.get_submodule(name).bias.any()


def test_unknown_backend():
    with pytest.raises(AllocatorError, match="unknown backend"):
        get_backend("nope")


@pytest.mark.parametrize("per_row", [True, False])
def test_prune_mask_removes_exactly_the_lowest_with_ties_by_index(per_row):
    gen = torch.Generator().manual_seed(3)
    score = torch.randint(0, 5, (6, 40), generator=gen).float()  # many ties
    level = parse_level("s0.45")
    mask = prune_mask(score, level, per_row)
    k = level.pruned_per_row(40)
    groups = [(score[r], mask[r]) for r in range(6)] if per_row else [(score.flatten(), mask.flatten())]
    for s, m in groups:
        want = k if per_row else k * 6
        assert int(m.sum()) == want
        assert s[m].max() <= s[~m].min()  # nothing kept is lower than anything removed
        thr = s[m].max()
        tied = (s == thr).nonzero().flatten()
        assert torch.equal(m[tied], torch.arange(len(tied)) < int(m[tied].sum()))  # ties: the first by index


@pytest.mark.parametrize("backend", ["magnitude", "wanda"])
def test_many_levels_from_one_sort_equal_each_level_alone_bit_for_bit(backend):
    """The profile's and database's path (one sort, every level) gives the weights of one-level compression (a
    k-th-value search per level), ties included, quantized levels and N:M too."""
    from allocator.backends import compress_levels, compress_recorded
    from allocator.backends.stats import LayerStats

    gen = torch.Generator().manual_seed(5)
    W = (torch.randint(-6, 7, (24, 64), generator=gen) / 4).to(torch.bfloat16)  # many equal |w|: ties
    stats = LayerStats(64, hessian=False)
    stats.add_batch(torch.randint(0, 3, (50, 64), generator=gen).float())  # equal column norms too
    levels = [parse_level(n) for n in ("dense", "s0.1", "s0.45", "s0.5", "s0.9", "2:4", "w4g32", "s0.5+w4g32", "fp8")]
    chosen = get_backend(backend)
    many = compress_levels(W, levels, chosen, stats)
    for level, (Q, params) in zip(levels, many, strict=True):
        alone, alone_params = compress_recorded(W, level, chosen, stats)
        assert torch.equal(Q, alone), level.name
        assert all(torch.equal(a, b) for a, b in zip(params, alone_params, strict=True))
