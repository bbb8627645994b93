"""GGUF types rounded as llama-quantize rounds them (no importance matrix), so profiles see what llama.cpp writes.

The legacy types (q4_0, q4_1, q5_0, q5_1, q8_0) go through gguf-py's own quantizer, which reproduces ggml's
reference rows. gguf-py cannot quantize the k-quants, so they are written here from the algorithms of ggml's
``quantize_row_q*_K_ref`` (``ggml/src/ggml-quants.c``), vectorised over sub-blocks in float32:
- q4_K / q5_K / q2_K: per sub-block, a weighted least-squares search over 21 / 16 / 16 candidate scales of
  an affine grid with a minimum (``make_qkx2_quants``); then the sub-block scales and minima are themselves
  quantized to 6 (4 for q2_K) bits against an fp16 super-block scale, and every weight is re-rounded.
- q6_K / q3_K: a symmetric grid whose scale is searched (19 candidates, ``make_qx_quants``) or refined by
  coordinate descent (``make_q3_quants``), then 8-bit (6-bit for q3_K) sub-block scales.
Sums run left to right in float32 as ggml's loops do, so the result is bit-exact with llama-quantize
(tests/test_ggml.py, on rows it wrote): ``ggml_roundtrip`` gives the dequantized values a profile sees,
``ggml_quantize`` the very blocks llama-quantize writes (k-quants laid out by :mod:`allocator.levels.ggml_pack`).
"""

from __future__ import annotations

import numpy as np
import torch

from allocator.levels.ggml_pack import KBlocks, pack

QK = 256  # weights per k-quant super-block
EPS = np.float32(1e-15)  # ggml's GROUP_MAX_EPS
LEGACY = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


def ggml_roundtrip(W: torch.Tensor, kind: str) -> torch.Tensor:
    """``W`` ([rows, cols]) quantized to GGUF type ``kind`` and dequantized, as llama-quantize writes it."""
    x = W.detach().to("cpu", torch.float32).numpy()
    if kind in LEGACY:
        import gguf

        qtype = gguf.GGMLQuantizationType[kind.upper()]
        out = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
    else:
        out = _KQUANTS[kind](_super_blocks(x, kind))[0].reshape(x.shape)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32)).to(W.device, W.dtype)


def ggml_quantize(W: np.ndarray, kind: str) -> np.ndarray:
    """The GGUF blocks llama-quantize writes for ``W`` ([rows, cols]): uint8 [rows, cols / block * type_size]."""
    x = np.ascontiguousarray(W, dtype=np.float32)
    if kind in LEGACY:
        import gguf

        return gguf.quants.quantize(x, gguf.GGMLQuantizationType[kind.upper()])

    return pack(kind, _KQUANTS[kind](_super_blocks(x, kind))[1]).reshape(len(x), -1)


def _super_blocks(x: np.ndarray, kind: str) -> np.ndarray:
    if kind not in _KQUANTS:
        raise ValueError(f"unknown GGUF type {kind!r}: use one of {', '.join([*_KQUANTS, *LEGACY])}")
    if x.ndim != 2 or x.shape[1] % QK:
        raise ValueError(f"{kind} needs rows of a multiple of {QK} weights, got shape {tuple(x.shape)}")
    return x.reshape(-1, QK)


def _round(v: np.ndarray) -> np.ndarray:
    """ggml's nearest_int: round half to even in float32."""
    return np.rint(v).astype(np.float32)


def _sum(v: np.ndarray) -> np.ndarray:
    """Row sums accumulated left to right in float32, as ggml's loops do (numpy sums pairwise)."""
    acc = v[:, 0].copy()
    for i in range(1, v.shape[1]):
        acc += v[:, i]
    return acc


def _affine(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int, mad: bool):
    """make_qkx2_quants over rows of ``x`` ([N, n]): (scale, minimum >= 0, codes) minimising the weighted error."""
    f32 = np.float32
    lo = np.minimum(x.min(1), 0).astype(f32)
    hi = x.max(1)
    span = hi - lo
    flat = span == 0
    span = np.where(flat, f32(1), span)

    def error(scale, low, L):
        d = scale[:, None] * L + low[:, None] - x
        return _sum(w * (np.abs(d) if mad else d * d))

    iscale = f32(nmax) / span
    scale = f32(1) / iscale
    L = np.clip(_round(iscale[:, None] * (x - lo[:, None])), 0, nmax)
    best, low = error(scale, lo, L), lo.copy()
    sw, sx = _sum(w), _sum(w * x)
    for step in range(nstep + 1):  # as in ggml, each candidate is laid from the best minimum so far
        iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / np.where(flat, f32(1), hi - low)
        La = np.clip(_round(iscale[:, None] * (x - low[:, None])), 0, nmax)
        sl, sl2, sxl = _sum(w * La), _sum(w * La * La), _sum(w * La * x)
        D = sw * sl2 - sl * sl
        ok = D > 0
        Ds = np.where(ok, D, f32(1))
        s_new, m_new = (sw * sxl - sx * sl) / Ds, (sl2 * sx - sl * sxl) / Ds
        pos = m_new > 0
        s_new = np.where(pos, sxl / np.where(sl2 > 0, sl2, f32(1)), s_new)
        m_new = np.where(pos, f32(0), m_new)
        cur = error(s_new, m_new, La)
        better = ok & (cur < best)
        best, scale, low = np.where(better, cur, best), np.where(better, s_new, scale), np.where(better, m_new, low)
        L = np.where(better[:, None], La, L)
    scale = np.where(flat, f32(0), scale).astype(f32)
    return scale, (-np.where(flat, lo, low)).astype(f32), np.where(flat[:, None], f32(0), L)


def _with_min(blocks: np.ndarray, sub: int, nmax: int, sbits: int, search: tuple) -> tuple[np.ndarray, KBlocks]:
    """q4_K / q5_K / q2_K: affine sub-blocks, their scales and minima quantized to ``sbits`` bits."""
    f32 = np.float32
    top = f32(2**sbits - 1)
    x = blocks.reshape(-1, sub)
    if sub == 32:
        av = np.sqrt(_sum(x * x) / f32(32)).astype(f32)
        w = av[:, None] + np.abs(x)
    else:
        w = np.abs(x)
    scale, mins, found = _affine(x, w, nmax, *search)
    scale, mins = scale.reshape(len(blocks), -1), mins.reshape(len(blocks), -1)
    max_scale, max_min = scale.max(1, keepdims=True).clip(0), mins.max(1, keepdims=True).clip(0)
    inv_s = np.where(max_scale > 0, top / np.where(max_scale > 0, max_scale, 1), f32(0))
    inv_m = np.where(max_min > 0, top / np.where(max_min > 0, max_min, 1), f32(0))
    ls, lm = np.minimum(top, _round(inv_s * scale)), np.minimum(top, _round(inv_m * mins))
    d16, dmin16 = (max_scale / top).astype(np.float16), (max_min / top).astype(np.float16)
    d, dm = d16.astype(f32) * ls, dmin16.astype(f32) * lm
    xb = blocks.reshape(len(blocks), -1, sub)
    safe = np.where(d == 0, f32(1), d)
    L = np.clip(_round((xb + dm[..., None]) / safe[..., None]), 0, nmax)
    codes = np.where(d[..., None] == 0, found.reshape(xb.shape), L)  # ggml keeps the search's codes there
    stored = KBlocks(d16[:, 0], dmin16[:, 0], ls.astype(np.uint8), lm.astype(np.uint8), codes.reshape(blocks.shape))
    return (d[..., None] * L - dm[..., None]).reshape(blocks.shape), stored


def _peak(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first value of largest magnitude (1 where the row is all zero), and where it is."""
    top = x[np.arange(len(x)), np.abs(x).argmax(1)]
    zero = np.abs(top) < EPS
    return np.where(zero, np.float32(1), top), zero


def _symmetric_scales(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants (rmse_type 1, weights x^2): the best of 19 scales for each row of ``x``, and its codes."""
    f32 = np.float32
    top, zero = _peak(x)
    w = x * x
    best, scale, found = None, None, None
    for step in [0, *[s for s in range(-9, 10) if s]]:
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / top
        L = np.clip(_round(iscale[:, None] * x), -nmax, nmax - 1)
        slx, sl2 = _sum(w * x * L), _sum(w * L * L)
        s = np.where(sl2 > 0, slx / np.where(sl2 > 0, sl2, f32(1)), f32(0))
        if best is None:
            best, scale, found = s * slx, s, L
            continue
        better = (sl2 > 0) & (slx * slx > best * sl2)
        scale, best = np.where(better, s, scale), np.where(better, s * slx, best)
        found = np.where(better[:, None], L, found)
    return np.where(zero, f32(0), scale).astype(f32), np.where(zero[:, None], f32(0), found + nmax)


def _q3_scales(x: np.ndarray, nmax: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants with do_rmse: round, then up to 5 sweeps of coordinate descent on the levels."""
    f32 = np.float32
    top, zero = _peak(x)
    w = x * x
    L = np.clip(_round((-f32(nmax) / top)[:, None] * x), -nmax, nmax - 1)
    slx_all, sl2_all = _sum(w * x * L), _sum(w * L * L)
    active = np.ones(len(x), bool)
    for _ in range(5):
        changed = np.zeros(len(x), bool)
        for i in range(x.shape[1]):
            xi, wi, Li = x[:, i], w[:, i], L[:, i]
            slx = slx_all - wi * xi * Li
            sl2 = sl2_all - wi * Li * Li
            new = np.clip(_round(xi * sl2 / np.where(slx > 0, slx, f32(1))), -nmax, nmax - 1)
            slx2, sl22 = slx + wi * xi * new, sl2 + wi * new * new
            take = active & (slx > 0) & (new != Li) & (sl22 > 0) & (slx2 * slx2 * sl2_all > slx_all * slx_all * sl22)
            L[:, i] = np.where(take, new, Li)
            slx_all, sl2_all = np.where(take, slx2, slx_all), np.where(take, sl22, sl2_all)
            changed |= take
        active &= changed
        if not active.any():
            break
    scale = np.where(sl2_all > 0, slx_all / np.where(sl2_all > 0, sl2_all, f32(1)), f32(0))
    return np.where(zero, f32(0), scale).astype(f32), np.where(zero[:, None], f32(0), L + nmax)


def _signed(blocks: np.ndarray, nmax: int, sbits: int) -> tuple[np.ndarray, KBlocks]:
    """q6_K (nmax 32, 8-bit scales) / q3_K (nmax 4, 6-bit scales): symmetric sub-blocks of 16."""
    f32 = np.float32
    x = blocks.reshape(-1, 16)
    scales, found = _symmetric_scales(x, nmax) if nmax == 32 else _q3_scales(x, nmax)
    scales = scales.reshape(len(blocks), -1)
    pick = np.abs(scales).argmax(1)
    max_scale = scales[np.arange(len(blocks)), pick][:, None]
    empty = np.abs(max_scale) < (EPS if nmax == 32 else f32(1e-30))
    half = f32(2 ** (sbits - 1))
    iscale = -half / np.where(empty, f32(1), max_scale)
    sc = _round(iscale * scales)  # q6_K clips only the top (+128 -> 127); q3_K both ends
    sc = np.minimum(half - 1, sc) if nmax == 32 else np.clip(sc, -half, half - 1)
    d16 = np.where(empty[:, 0], np.float16(0), (f32(1) / iscale[:, 0]).astype(np.float16))
    d = np.where(empty, f32(0), d16[:, None].astype(f32) * sc)
    xb = blocks.reshape(len(blocks), -1, 16)
    L = np.clip(_round(xb / np.where(d == 0, f32(1), d)[..., None]), -nmax, nmax - 1)
    codes = np.where(d[..., None] == 0, found.reshape(xb.shape), L + nmax).reshape(blocks.shape)
    # an empty block is stored as zeros: q6_K's whole block, q3_K's scale bytes (ggml's memset)
    codes = np.where(empty & (nmax == 32), f32(0), codes)
    sc = np.where(empty, f32(0), sc if nmax == 32 else sc + half).astype(np.int8 if nmax == 32 else np.uint8)
    stored = KBlocks(d16, np.zeros_like(d16), sc, np.zeros_like(sc), codes)
    return (d[..., None] * L).reshape(blocks.shape), stored


_KQUANTS = {
    "q4_K": lambda b: _with_min(b, 32, 15, 6, (-1.0, 0.1, 20, False)),
    "q5_K": lambda b: _with_min(b, 32, 31, 6, (-0.5, 0.1, 15, False)),
    "q2_K": lambda b: _with_min(b, 16, 3, 4, (-0.5, 0.1, 15, True)),
    "q6_K": lambda b: _signed(b, 32, 8),
    "q3_K": lambda b: _signed(b, 4, 6),
}
