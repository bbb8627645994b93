"""The compact level database: every encoding decodes to exactly the backend's output."""

from __future__ import annotations

import pytest
import torch

from allocator.backends import BACKENDS, compress_levels
from allocator.backends.codec import decode, encode_layer, pack, unpack
from allocator.backends.stats import LayerStats
from allocator.levels import parse_grid, parse_level, with_dense

# every level type: unstructured, N:M, bits (grouped, per row, asymmetric, a short last group), sparse+bits, drop
GRID = with_dense(parse_grid("0:0.9:0.1,2:4,w8,w4g64,w3g48,w2g64,w4a,s0.5+w4g64,drop"))


@pytest.mark.parametrize("width", [1, 2, 4, 8])
def test_pack_unpack_round_trip(width):
    codes = torch.randint(2**width, (7, 13), generator=torch.Generator().manual_seed(width), dtype=torch.uint8)
    packed = pack(codes, width)
    assert packed.numel() == -(-codes.numel() * width // 8)
    assert torch.equal(unpack(packed, width, codes.numel()).view(7, 13), codes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_every_level_type_decodes_exactly(backend, dtype):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 512, generator=g).to(dtype)
    stats = LayerStats(512)
    stats.add_batch(torch.randn(600, 512, generator=g))
    results = dict(zip(GRID, compress_levels(W, GRID, BACKENDS[backend], stats), strict=True))
    compressed = {level: Q for level, (Q, _) in results.items()}
    parts, entries = encode_layer(W, compressed, {level: params for level, (_, params) in results.items()})
    for level, Q in compressed.items():
        got = decode(entries[level.name], level, parts, tuple(W.shape))
        assert got.dtype == Q.dtype and torch.equal(got, Q), (backend, level.name, entries[level.name])
    encodings = {name: e["enc"] for name, e in entries.items()}
    unstructured = [lv.name for lv in GRID if lv.prune is not None and lv.prune.nm is None and not lv.quantized]
    # nested pruning needs no per-level copy; moved kept values (OBS) need mask + values
    expected = "order" if backend in ("magnitude", "rtn", "wanda") else "masked"
    assert {encodings[name] for name in unstructured} == {expected}
    assert {encodings[lv.name] for lv in GRID if lv.quantized} == {"grid"}  # codes and scales, as checkpoints
    assert encodings["dense"] == "dense" and encodings["drop"] == "zeros"
    stored = sum(t.numel() * t.element_size() for t in parts.values())
    full = len(GRID) * W.numel() * W.element_size()
    assert stored < (0.35 if expected == "order" else 0.7) * full


def test_chain_skips_a_level_that_is_not_nested():
    """A level whose removed set is not a superset of the chain's is stored by mask, and still exact."""
    W = torch.arange(1, 17, dtype=torch.float32).view(2, 8)
    low, mid, high = parse_grid("s0.25,s0.5,s0.75")
    compressed = {low: W.masked_fill(W <= 2, 0), mid: W.masked_fill(W > 8, 0), high: W.masked_fill(W <= 12, 0)}
    parts, entries = encode_layer(W, compressed)
    assert entries[low.name]["enc"] == "order" and entries[high.name]["enc"] == "order"
    assert entries[mid.name]["enc"] == "masked"
    for level, Q in compressed.items():
        assert torch.equal(decode(entries[level.name], level, parts, (2, 8)), Q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ordered_counts_ulps_across_zero_and_inverts(dtype):
    from allocator.backends.codec import _ordered

    x = torch.tensor([-2.0, -1.0, -0.0, 0.0, 1.0, 2.0], dtype=dtype)
    o = _ordered(x)
    assert torch.equal(o, o.sort().values) and o[3] - o[2] == 1  # the floats' order; -0 and +0 adjacent
    y = x[x != 0]
    up = torch.nextafter(y, torch.full_like(y, float("inf")))
    assert torch.equal(_ordered(up) - _ordered(y), torch.ones(len(y), dtype=torch.int32))  # next float: +1
    assert torch.equal(_ordered(o.short()).short().view(dtype), x)  # its own inverse


def test_moved_bf16_values_are_stored_as_steps_with_exceptions():
    """Kept values a few ulps from dense become 4-bit steps; a value far away is kept as an exception."""
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(8, 64, generator=g).bfloat16()
    Q = dense.clone()
    Q[:, ::2] = 0
    Q[:, 1::2] = Q[:, 1::2].float().mul(1.01).bfloat16()  # about one ulp
    Q[0, 1] = 100.0  # far: an exception
    level = parse_grid("s0.5")[0]
    parts, entries = encode_layer(dense, {level: Q})
    assert entries["s0.5"] == {"enc": "masked", "values": "steps", "width": 4, "kept": 256}
    assert parts["s0.5|exceptions"].tolist() == [100.0]
    assert torch.equal(decode(entries["s0.5"], parse_level("s0.5"), parts, (8, 64)), Q)
