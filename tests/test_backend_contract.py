"""Contract tests over every backend: exact density, valid N:M, <= 2^b values per group, dense = identity."""

from __future__ import annotations

import pytest
import torch

from allocator.backends import BACKENDS, apply_, compress_weight
from allocator.backends.stats import LayerStats
from allocator.inventory import Inventory, weight_view
from allocator.levels import parse_level
from tests.conftest import VOCAB, tiny_model

ROWS, COLS = 32, 256


@pytest.fixture(scope="module")
def layer():
    """A weight and correlated inputs (low-rank + noise), like real activations."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(ROWS, COLS, generator=gen)
    X = torch.randn(2048, 16, generator=gen) @ torch.randn(16, COLS, generator=gen) + 0.3 * torch.randn(
        2048, COLS, generator=gen
    )
    X[:, :8] *= 10  # a few outlier features, as LLMs have
    stats = LayerStats(COLS)
    for chunk in X.split(512):
        stats.add_batch(chunk)
    return W, X, stats


def _recon_error(W, Q, X):
    return float(((X @ (W - Q).t()) ** 2).sum() / ((X @ W.t()) ** 2).sum())


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name", ["s0.3", "s0.5", "s0.7", "2:4", "4:8"])
def test_sparsity_is_exact(backend, name, layer):
    W, _, stats = layer
    level = parse_level(name)
    Q = compress_weight(W, level, BACKENDS[backend], stats)
    zeros_per_row = (Q == 0).sum(1)
    nm = level.prune.nm
    if backend in ("magnitude", "rtn") and not nm:  # layer-wise threshold: exact per layer
        assert int(zeros_per_row.sum()) == ROWS * level.pruned_per_row(COLS)
    else:
        assert (zeros_per_row == level.pruned_per_row(COLS)).all()
    if nm:
        assert ((Q != 0).view(ROWS, -1, nm[1]).sum(-1) <= nm[0]).all()


@pytest.mark.parametrize("backend", sorted(BACKENDS))
@pytest.mark.parametrize("name", ["w2", "w3g64", "w4g128", "w4g32a", "w8", "s0.5+w4g64", "2:4+w3a"])
def test_quantized_groups_use_at_most_2_pow_b_values(backend, name, layer):
    W, _, stats = layer
    level = parse_level(name)
    Q = compress_weight(W, level, BACKENDS[backend], stats)
    g = level.weights.group or COLS
    for r in range(0, ROWS, 7):
        for c in range(0, COLS, g):
            assert Q[r, c : c + g].unique().numel() <= 2**level.weights.bits
    if level.sparsity:  # rounding may add zeros, never remove the pruned ones
        assert int((Q == 0).sum()) >= ROWS * level.pruned_per_row(COLS)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_dense_level_is_identity_and_drop_is_zero(backend, layer):
    W, _, stats = layer
    assert torch.equal(compress_weight(W, parse_level("dense"), BACKENDS[backend], stats), W)
    assert not compress_weight(W, parse_level("drop"), BACKENDS[backend], stats).any()


@pytest.mark.parametrize("name", ["s0.5", "s0.7", "2:4"])
def test_sparsegpt_beats_wanda_and_magnitude_on_correlated_inputs(name, layer):
    W, X, stats = layer
    err = {b: _recon_error(W, compress_weight(W, parse_level(name), BACKENDS[b], stats), X)
           for b in ("magnitude", "wanda", "sparsegpt")}  # fmt: skip
    assert err["sparsegpt"] < min(err["wanda"], err["magnitude"]), err


@pytest.mark.parametrize("name", ["w2g64", "w3", "w4g128", "w3g32a"])
def test_gptq_beats_rtn(name, layer):
    W, X, stats = layer
    err = {b: _recon_error(W, compress_weight(W, parse_level(name), BACKENDS[b], stats), X) for b in ("rtn", "gptq")}
    assert err["gptq"] < err["rtn"], err


@pytest.mark.parametrize("backend", ["wanda", "sparsegpt", "gptq"])
def test_data_backends_apply_block_by_block(backend):
    model = tiny_model("llama")
    inv = Inventory.from_model(model)
    calib = torch.randint(VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    level = parse_level("2:4" if backend != "gptq" else "w4g32")
    apply_(model, {lay.name: level for lay in inv.layers}, backend, calib, batch_size=2)
    for lay in inv.layers:
        W = weight_view(model.get_submodule(lay.name))
        if level.prune is not None:
            assert ((W != 0).view(lay.rows, -1, 4).sum(-1) <= 2).all()
        else:
            assert W[0, :32].unique().numel() <= 16


def test_data_backend_without_data_is_a_clear_error():
    from allocator.errors import AllocatorError

    model = tiny_model("llama")
    with pytest.raises(AllocatorError, match="needs calibration"):
        apply_(model, {"model.layers.0.mlp.up_proj": parse_level("s0.5")}, "sparsegpt")
