"""One OBS solver for SparseGPT (Frantar & Alistarh 2023) and GPTQ (Frantar et al. 2022).

Both process the input columns left to right: column i is pruned and/or quantized, and its error
``(w - q) / [H^-1]_ii`` is spread over the not-yet-processed columns through row i of the upper
Cholesky factor of ``H^-1`` (the OBS update, SparseGPT Alg. 1 / GPTQ Alg. 1), lazily in blocks of
``blocksize`` columns. SparseGPT chooses its mask inside each block by ``w^2 / [H^-1]_ii^2``; here
per row (k weights per row and block, so each row ends with exactly the level's density) and per
N:M group. GPTQ quantizes with grid parameters taken from the current (updated) weights of each
group. A sparse+bits level does both in the same pass, as SparseGPT's joint mode.
"""

from __future__ import annotations

import math

import torch

from allocator.backends.quant import grid_params, quantize
from allocator.levels import Level


def hinv_factor(H: torch.Tensor, W: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the damped inverse Hessian, and the mask of dead input columns.

    Columns whose inputs were always zero get H_jj = 1 (their weights are irrelevant and zeroed).
    """
    H = H.clone().double()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    H.diagonal().add_(percdamp * H.diagonal().mean())
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(Hinv, upper=True).to(W.dtype if W.is_floating_point() else torch.float32), dead


def _pruned_before(level: Level, c: int) -> int:
    """Weights per row an unstructured level removes among the first c columns (sums to the level's count)."""
    return min(c, math.ceil(level.sparsity * c - 1e-9))


@torch.no_grad()
def obs_compress(
    W: torch.Tensor, H: torch.Tensor, level: Level, blocksize: int = 128, percdamp: float = 0.01
) -> torch.Tensor:
    """Prune and/or quantize ``W`` ([rows, cols]) to ``level`` minimising ||W X - Ŵ X||² under H."""
    W = W.clone().float()
    rows, cols = W.shape
    Hinv, dead = hinv_factor(H.to(W.device), W, percdamp)  # [cols, cols], upper
    W[:, dead] = 0
    prune_nm, prune_u = level.m > 0, (level.sparsity > 0 and not level.m)
    quant, g = level.quantized, level.group_size or cols
    if level.m:
        blocksize = max(level.m, blocksize // level.m * level.m)
    mask = torch.zeros_like(W, dtype=torch.bool)  # True = pruned
    scale = zero = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # [rows, b]
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()  # [b]
        if prune_u:  # SparseGPT's adaptive mask selection, per row within the block
            k = _pruned_before(level, i2) - _pruned_before(level, i1)
            if k:
                score = W1**2 / d[None, :] ** 2
                mask[:, i1:i2].scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
        for i in range(i2 - i1):
            col = i1 + i
            if prune_nm and i % level.m == 0:
                score = W1[:, i : i + level.m] ** 2 / d[None, i : i + level.m] ** 2  # [rows, m]
                drop = torch.topk(score, level.m - level.n, dim=1, largest=False).indices
                mask[:, col : col + level.m].scatter_(1, drop, True)
            if quant and col % g == 0:
                current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                current = current.masked_fill(mask[:, col : col + current.shape[1]], 0)
                scale, zero = grid_params(current, level.bits, level.sym)
            w = W1[:, i]
            q = w.masked_fill(mask[:, col], 0)
            if quant:
                q = quantize(q[:, None], scale, zero, level.bits)[:, 0].masked_fill(mask[:, col], 0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W
