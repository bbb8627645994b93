"""SparseGPT/GPTQ (Cholesky, lazy blocks, float32) against the literal OBS formulas in float64.

The reference re-inverts the Hessian of the not-yet-processed columns at every step and applies
``δ = -(w_i - q_i) / [H_F^-1]_ii · [H_F^-1]_{i,:}`` (GPTQ eq. 3): no Cholesky, no lazy updates.
"""

from __future__ import annotations

import math

import pytest
import torch

from allocator.backends.obs import obs_compress, obs_compress_levels
from allocator.levels import Level, parse_level
from allocator.levels.ints import grid_params, quantize


def _reference(W: torch.Tensor, H: torch.Tensor, level: Level, blocksize: int, percdamp: float = 0.01):
    W = W.double().clone()
    H = H.double().clone()
    H.diagonal().add_(percdamp * H.diagonal().mean())
    rows, cols = W.shape
    mask = torch.zeros(rows, cols, dtype=torch.bool)
    w = level.weights
    g = (w.group or cols) if w is not None else cols
    nm = level.prune.nm if level.prune is not None else None
    diag = [torch.linalg.inv(H[j:, j:])[0, 0] for j in range(cols)]  # [H_{F_j}^-1]_jj
    scale = zero = None
    for i in range(cols):
        Hinv_F = torch.linalg.inv(H[i:, i:])  # F = {i, ..., cols-1}
        if level.sparsity and not nm and i % blocksize == 0:
            i2 = min(i + blocksize, cols)
            k = min(i2, math.ceil(level.sparsity * i2 - 1e-9)) - min(i, math.ceil(level.sparsity * i - 1e-9))
            if k:
                score = W[:, i:i2] ** 2 / torch.stack(diag[i:i2])[None, :]
                mask[:, i:i2].scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
        if nm and i % nm[1] == 0:
            score = W[:, i : i + nm[1]] ** 2 / torch.stack(diag[i : i + nm[1]])[None, :]
            mask[:, i : i + nm[1]].scatter_(1, torch.topk(score, nm[1] - nm[0], 1, largest=False).indices, True)
        if level.quantized and i % g == 0:
            scale, zero = grid_params(W[:, i : i + g].masked_fill(mask[:, i : i + g], 0), w.bits, w.sym)
        q = W[:, i].masked_fill(mask[:, i], 0)
        if level.quantized:
            q = quantize(q[:, None], scale, zero, w.bits)[:, 0].masked_fill(mask[:, i], 0)
        W[:, i:] -= ((W[:, i] - q) / Hinv_F[0, 0])[:, None] * Hinv_F[0, :][None, :]
        W[:, i] = q  # equal up to rounding; set exactly
    return W


@pytest.mark.parametrize("name", ["s0.5", "s0.3", "2:4", "w3", "w4g8", "w2g16a", "s0.5+w4g8", "2:4+w3g16"])
def test_obs_matches_float64_reference(name):
    gen = torch.Generator().manual_seed(1)
    rows, cols, blocksize = 6, 32, 16
    W = torch.randn(rows, cols, generator=gen)
    X = torch.randn(200, cols, generator=gen) @ torch.randn(cols, cols, generator=gen) * 0.3
    H = 2 * X.t() @ X / X.shape[0]
    level = parse_level(name)
    got = obs_compress(W, H, level, blocksize=blocksize).double()
    ref = _reference(W, H, level, blocksize)
    assert torch.equal(got == 0, ref == 0) or level.quantized  # same mask when only pruning
    if level.quantized:  # a rounding decision may flip on float32 noise; nearly all must agree
        close = (got - ref).abs() <= 1e-4 * ref.abs().max()
        assert close.float().mean() > 0.97
    else:
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * ref.abs().max())


def test_stacked_levels_equal_one_level_at_a_time(monkeypatch):
    """Levels run stacked along rows (and in turns when the stack is capped) give each level's own result."""
    gen = torch.Generator().manual_seed(2)
    rows, cols = 5, 48
    W = torch.randn(rows, cols, generator=gen)
    X = torch.randn(300, cols, generator=gen) @ torch.randn(cols, cols, generator=gen) * 0.3
    H = 2 * X.t() @ X / X.shape[0]
    names = ["s0.25", "w4g16", "s0.5", "2:4", "s0.7", "1:4", "w3g16", "s0.5+w4g16", "w8g16", "4:8", "2:4+w3g16"]
    levels = [parse_level(n) for n in names]
    one = [obs_compress(W, H, lv, blocksize=16) for lv in levels]
    tol = 50 * torch.finfo(torch.float32).eps * W.abs().max()
    for cap in (10**9, 2 * W.numel()):  # everything in one stack per group; at most two levels per turn
        monkeypatch.setattr("allocator.backends.obs.MAX_STACK", cap)
        stacked = [Q for Q, _ in obs_compress_levels(W, H, levels, blocksize=16)]
        for name, a, b in zip(names, one, stacked, strict=True):
            if parse_level(name).quantized:  # a rounding decision may flip on float32 noise
                assert ((a - b).abs() <= tol).float().mean() > 0.97, name
            else:
                assert torch.equal(a == 0, b == 0), name  # the same mask
                assert torch.allclose(a, b, rtol=0, atol=tol), name


def test_gguf_types_stack_apart_from_integer_formats_of_the_same_grid():
    """q4_0 rounds through its own quantizer: stacked beside w4g32 (the same 32-wide grid) it is not handed to the
    integer one, and each level equals its own run."""
    gen = torch.Generator().manual_seed(3)
    W = torch.randn(4, 64, generator=gen)
    X = torch.randn(200, 64, generator=gen)
    H = 2 * X.t() @ X / X.shape[0]
    levels = [parse_level(n) for n in ("w4g32", "q4_0", "q8_0", "w8g32")]
    one = [obs_compress(W, H, lv, blocksize=16) for lv in levels]
    stacked = [Q for Q, _ in obs_compress_levels(W, H, levels, blocksize=16)]
    tol = 50 * torch.finfo(torch.float32).eps * W.abs().max()
    for level, a, b in zip(levels, one, stacked, strict=True):
        assert ((a - b).abs() <= tol).float().mean() > 0.97, level.name
