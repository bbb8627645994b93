"""GGUF types rounded as llama.cpp rounds them: checked against rows a real llama-quantize wrote.

tests/data/ggml_rows.safetensors (scripts/ggml_fixture.py): 8 rows of a 576-wide and a 1536-wide SmolLM2 tensor,
moved off every grid by noise, as F16, and the blocks llama-quantize (llama.cpp b11434, ``--pure``, no imatrix)
wrote for them in each type. Decoded with gguf-py, they are the reference; as bytes, the reference of the packing.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from allocator.backends import BACKENDS, compress_weight
from allocator.levels import parse_level
from allocator.levels.ggml import ggml_quantize, ggml_roundtrip

ROWS = load_file(Path(__file__).parent / "data" / "ggml_rows.safetensors")
WRITTEN = sorted(k for k in ROWS if not k.startswith("source."))
TYPES = ("q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


def llama_cpp(key: str) -> np.ndarray:
    kind = key.split(".")[0]
    return gguf.quants.dequantize(ROWS[key], gguf.GGMLQuantizationType[kind.upper()])


def test_the_fixture_holds_every_type():
    kinds = {k.split(".")[0] for k in WRITTEN}
    assert kinds == {"q8_0", "q6_K", "q5_K", "q5_1", "q5_0", "q4_K", "q4_1", "q4_0", "q3_K", "q2_K"}


@pytest.mark.parametrize("key", WRITTEN)
def test_ggml_rounding_is_bit_exact_with_llama_quantize(key):
    """Every weight equal to what llama.cpp wrote (k-quants: the scale searches and 6-bit sub-scales too)."""
    kind, width = key.split(".")
    source = torch.from_numpy(ROWS[f"source.{width}"].astype(np.float32))
    ours = ggml_roundtrip(source, kind).numpy()
    np.testing.assert_array_equal(ours, llama_cpp(key))


@pytest.mark.parametrize("backend", ["rtn", "magnitude"])
def test_rtn_backends_write_gguf_levels_as_llama_cpp_stores_them_fallback_included(backend):
    """q4_K on 1536-wide rows is llama.cpp's q4_K; on 576-wide rows llama-quantize falls back to q5_0."""
    wide = torch.from_numpy(ROWS["source.wide"].astype(np.float32))
    narrow = torch.from_numpy(ROWS["source.narrow"].astype(np.float32))
    got = compress_weight(wide, parse_level("q4_K"), BACKENDS[backend], None).numpy()
    np.testing.assert_array_equal(got, llama_cpp("q4_K.wide"))
    got = compress_weight(narrow, parse_level("q4_K"), BACKENDS[backend], None).numpy()
    np.testing.assert_array_equal(got, llama_cpp("q5_0.narrow"))


def test_ggml_rounding_keeps_device_and_dtype_and_an_all_zero_block():
    W = torch.zeros(2, 512, dtype=torch.bfloat16)
    W[1, 256:] = torch.linspace(-1, 1, 256)
    for kind in ("q4_K", "q6_K", "q3_K", "q2_K", "q5_K", "q4_0"):
        Q = ggml_roundtrip(W, kind)
        assert Q.dtype == W.dtype and Q.shape == W.shape
        assert not Q[:, :256].any() and not Q[0].any()  # zero blocks stay zero
        assert (Q[1, 256:].float() - W[1, 256:].float()).abs().max() < 0.3  # and the rest stays close


@pytest.mark.parametrize("key", WRITTEN)
def test_ggml_blocks_are_byte_exact_with_llama_quantize(key):
    """The blocks themselves, not only their values: codes, sub-block scales, fp16 scales, bit layout."""
    kind, width = key.split(".")
    ours = ggml_quantize(ROWS[f"source.{width}"].astype(np.float32), kind)
    assert ours.dtype == np.uint8 and ours.shape == ROWS[key].shape
    np.testing.assert_array_equal(ours, ROWS[key])


def awkward_rows() -> np.ndarray:
    """Random rows with what the searches branch on: an all-zero block, one huge outlier, a constant row,
    rows of one sign, a sub-block of near-zeros, sparse and heavy-tailed rows."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((16, 512)) * 0.02).astype(np.float32)
    x[0, :256] = 0  # a whole super-block of zeros
    x[1, 77] = 1e4  # one outlier dwarfing its block
    x[2] = 0.5
    x[3], x[4] = np.abs(x[3]), -np.abs(x[4])
    x[5, 256:272] = 1e-20
    x[6, rng.random(512) < 0.9] = 0
    x[7:] = rng.standard_t(2, (9, 512))
    return x


@pytest.mark.parametrize("kind", TYPES)
def test_packed_blocks_decode_to_the_rounded_weights(kind):
    """gguf-py (as llama.cpp) reads back from our bytes exactly what ggml_roundtrip gives (zeros up to sign)."""
    x = awkward_rows()
    qtype = gguf.GGMLQuantizationType[kind.upper()]
    blocks = ggml_quantize(x, kind)
    size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    assert blocks.dtype == np.uint8 and blocks.shape == (16, 512 // size * type_size)
    expected = ggml_roundtrip(torch.from_numpy(x), kind).numpy()
    np.testing.assert_array_equal(gguf.quants.dequantize(blocks, qtype), expected)
    assert not expected[0, :256].any() and np.isfinite(expected).all()
