"""k-quant super-blocks laid into ggml's block structs (``block_q2_K`` … ``block_q6_K``, ggml-common.h).

Each layout is the inverse of gguf-py's ``dequantize_blocks`` for the type and follows the packing loops of
ggml's ``quantize_row_q*_K_ref``, so the bytes equal what llama-quantize writes (tests/test_ggml.py).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class KBlocks(NamedTuple):
    """A k-quant's super-blocks as ggml stores them, before packing: integers and fp16 scales, per block."""

    d: np.ndarray  # [n] float16 scale of the sub-block scales
    dmin: np.ndarray  # [n] float16 scale of the sub-block minima (zero where the type has none)
    scales: np.ndarray  # [n, subs] sub-block scales as stored (q3_K: 6 bits offset by 32; q6_K: int8)
    mins: np.ndarray  # [n, subs] sub-block minima as stored (zero where the type has none)
    codes: np.ndarray  # [n, 256] weight codes as stored (q3_K offset by 4, q6_K by 32)


def pack(kind: str, b: KBlocks) -> np.ndarray:
    """The uint8 blocks [n, type_size] of type ``kind`` holding the super-blocks ``b``."""
    return _PACKERS[kind](b)


def _u8(v: np.ndarray) -> np.ndarray:
    return v.astype(np.uint8)


def _half(v: np.ndarray) -> np.ndarray:
    """fp16 values as their two little-endian bytes each: [n] -> [n, 2]."""
    return v.astype("<f2").reshape(-1, 1).view(np.uint8)


def _planes(codes: np.ndarray, group: int, bits: int) -> np.ndarray:
    """Fold each run of ``group * (8 // bits)`` codes into ``group`` bytes: code ``k * group + l`` of a run goes
    to bits ``k * bits`` of byte ``l`` (the order of ggml's ``qs``/``qh`` loops)."""
    per = 8 // bits
    runs = _u8(codes).reshape(len(codes), -1, per, group)
    shifts = (np.arange(per, dtype=np.uint8) * bits).reshape(1, 1, per, 1)
    return np.bitwise_or.reduce(runs << shifts, axis=2).reshape(len(codes), -1)


def _scales_k4(scales: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """q4_K / q5_K: eight 6-bit scales and minima in 12 bytes (the inverse of get_scale_min_k4)."""
    s, m = _u8(scales), _u8(mins)
    out = np.empty((len(s), 12), np.uint8)
    out[:, 0:4] = s[:, :4] | ((s[:, 4:] >> 4) << 6)
    out[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    out[:, 8:12] = (s[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return out


def _q2_K(b: KBlocks) -> np.ndarray:
    scales = _u8(b.scales) | (_u8(b.mins) << 4)
    return np.concatenate([scales, _planes(b.codes, 32, 2), _half(b.d), _half(b.dmin)], axis=1)


def _q3_K(b: KBlocks) -> np.ndarray:
    codes = _u8(b.codes)
    hmask = _planes(codes >> 2, 32, 1)  # the high bit of weight j in bit j // 32 of byte j % 32
    s = _u8(b.scales)
    scales = np.empty((len(s), 12), np.uint8)
    scales[:, :8] = (s[:, :8] & 0xF) | ((s[:, 8:] & 0xF) << 4)
    scales[:, 8:] = _planes(s >> 4, 4, 2)  # the top 2 bits of scale j in bits 2 * (j // 4) of byte 8 + j % 4
    return np.concatenate([hmask, _planes(codes & 3, 32, 2), scales, _half(b.d)], axis=1)


def _q4_K(b: KBlocks) -> np.ndarray:
    qs = _planes(b.codes, 32, 4)
    return np.concatenate([_half(b.d), _half(b.dmin), _scales_k4(b.scales, b.mins), qs], axis=1)


def _q5_K(b: KBlocks) -> np.ndarray:
    codes = _u8(b.codes)
    qh, qs = _planes(codes >> 4, 32, 1), _planes(codes & 0xF, 32, 4)
    return np.concatenate([_half(b.d), _half(b.dmin), _scales_k4(b.scales, b.mins), qh, qs], axis=1)


def _q6_K(b: KBlocks) -> np.ndarray:
    codes = _u8(b.codes).reshape(len(b.codes), 2, 128)  # two halves of 128 weights
    low = codes & 0xF
    ql = low[:, :, :64] | (low[:, :, 64:] << 4)  # weights l and l + 64 of a half share byte l
    qh = _planes(codes.reshape(len(codes), -1) >> 4, 32, 2)
    return np.concatenate([ql.reshape(len(codes), -1), qh, b.scales.view(np.uint8), _half(b.d)], axis=1)


_PACKERS = {"q2_K": _q2_K, "q3_K": _q3_K, "q4_K": _q4_K, "q5_K": _q5_K, "q6_K": _q6_K}
