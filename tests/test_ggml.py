"""GGUF types rounded as llama.cpp rounds them: checked against rows a real llama-quantize wrote.

tests/data/ggml_rows.safetensors (scripts/ggml_fixture.py): 8 rows of a 576-wide and a 1536-wide SmolLM2 tensor,
moved off every grid by noise, as F16, and the blocks llama-quantize (llama.cpp b11434, ``--pure``, no imatrix)
wrote for them in each type. Decoded with gguf-py, they are the reference.
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
from allocator.levels.ggml import ggml_roundtrip

ROWS = load_file(Path(__file__).parent / "data" / "ggml_rows.safetensors")
WRITTEN = sorted(k for k in ROWS if not k.startswith("source."))


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
