"""One OBS solver for SparseGPT (Frantar & Alistarh 2023) and GPTQ (Frantar et al. 2022).

Both process the input columns left to right: column i is pruned and/or quantized, and its error
``(w - q) / [H^-1]_ii`` is spread over the not-yet-processed columns through row i of the upper
Cholesky factor of ``H^-1`` (the OBS update, SparseGPT Alg. 1 / GPTQ Alg. 1), lazily in blocks of
``blocksize`` columns. SparseGPT chooses its mask inside each block by ``w^2 / [H^-1]_ii^2``; here
per row (k weights per row and block, so each row ends with exactly the level's density) and per
N:M group. GPTQ quantizes with grid parameters taken from the current (updated) weights of each
group. A sparse+bits level does both in the same pass, as SparseGPT's joint mode.

Rows never interact (every row is updated through the same ``H^-1``), so several levels of one layer
run as one stacked problem: one inverse per layer, and one column loop for all levels that share an
N:M group size and a quantization group (their sparsity, N and bit-width may differ row-block by
row-block). On a GPU this loop is bound by kernel launches, so stacking L levels makes it ~L× faster.
"""

from __future__ import annotations

import torch

from allocator.levels import Level
from allocator.levels.quantizer import Params, Recorder

MAX_STACK = 2**26  # elements of one stacked problem on a CPU (256 MB in float32); more levels run in turns


def hinv_factor(H: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of the damped inverse Hessian, and the mask of dead input columns.

    Columns whose inputs were always zero get H_jj = 1 (their weights are irrelevant and zeroed).
    """
    H = H.clone().double()
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    H.diagonal().add_(percdamp * H.diagonal().mean())
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(Hinv, upper=True).float(), dead  # the column loop runs in float32


def _pruned_before(sparsity: torch.Tensor, c: int) -> torch.Tensor:
    """Weights per row an unstructured level removes among the first c columns (sums to the level's count)."""
    return torch.ceil(sparsity * c - 1e-9).clamp(max=c).long()


def _group_key(level: Level) -> tuple:
    """Levels with equal keys share one column loop (blocks aligned to m, one quantizer for their formats)."""
    nm = level.prune.nm if level.prune is not None else None
    return (nm[1] if nm else 0), (level.weights.stack_key() if level.weights is not None else None)


@torch.no_grad()
def obs_compress(
    W: torch.Tensor, H: torch.Tensor, level: Level, blocksize: int = 128, percdamp: float = 0.01
) -> torch.Tensor:
    """Prune and/or quantize ``W`` ([rows, cols]) to ``level`` minimising ||W X - Ŵ X||² under H."""
    return obs_compress_levels(W, H, [level], blocksize, percdamp)[0][0]


@torch.no_grad()
def obs_compress_levels(
    W: torch.Tensor, H: torch.Tensor, levels: list[Level], blocksize: int = 128, percdamp: float = 0.01,
    peers: torch.Tensor | None = None,
) -> list[tuple[torch.Tensor, Params]]:  # fmt: skip
    """:func:`obs_compress` of ``W`` at each of ``levels`` (with each one's grid parameters, [rows, groups]),
    sharing the inverse and stacking the levels (``peers``: see :meth:`allocator.levels.Quantizer.prepare`)."""
    Hinv, dead = hinv_factor(H.to(W.device), percdamp)  # [cols, cols], upper
    out: list[tuple[torch.Tensor, Params] | None] = [None] * len(levels)
    groups: dict[tuple, list[int]] = {}
    for i, level in enumerate(levels):
        groups.setdefault(_group_key(level), []).append(i)
    per_turn = max(1, _stack_limit(W.device) // W.numel())
    for members in groups.values():
        for t in range(0, len(members), per_turn):
            turn = members[t : t + per_turn]
            stacked, params = _obs_stacked(W, Hinv, dead, [levels[i] for i in turn], blocksize, peers)
            per_level = [tuple(p.split(W.shape[0])[k] for p in params) for k in range(len(turn))]
            for i, Q, p in zip(turn, stacked.split(W.shape[0]), per_level, strict=True):
                out[i] = (Q, p)
    return out  # type: ignore[return-value]


def _stack_limit(device: torch.device) -> int:
    """Elements one stacked problem may hold: on a GPU a fifth of its free memory (about 5 bytes each)."""
    if device.type != "cuda":
        return MAX_STACK
    return max(MAX_STACK, torch.cuda.mem_get_info(device)[0] // 25)


def _obs_stacked(W: torch.Tensor, Hinv: torch.Tensor, dead: torch.Tensor, levels: list[Level], blocksize: int,
                 peers: torch.Tensor | None = None):  # fmt: skip
    """The column loop on ``len(levels)`` copies of ``W`` stacked along rows; levels share ``_group_key``.
    Grid parameters are rounded to ``W``'s dtype before use, so the stored scale is the one the values used."""
    rows, cols = W.shape
    store = W.dtype
    W = W.float().repeat(len(levels), 1)
    W[:, dead] = 0
    per_row = lambda values, dtype: torch.tensor(values, dtype=dtype, device=W.device).repeat_interleave(rows)  # noqa: E731
    nms = [lv.prune.nm if lv.prune is not None else None for lv in levels]
    m = nms[0][1] if nms[0] else 0
    sparsity = per_row([0.0 if nm else lv.sparsity for lv, nm in zip(levels, nms, strict=True)], torch.float64)
    prune_u = bool((sparsity > 0).any())
    if m:
        blocksize = max(m, blocksize // m * m)
        drop_nm = per_row([nm[1] - nm[0] for nm in nms], torch.long)[:, None]  # [R, 1]
        slots = torch.arange(m, device=W.device)[None, :]
    formats = [lv.weights for lv in levels]
    quantizer = None
    if formats[0] is not None:
        quantizer = Recorder(type(formats[0]).quantizer(formats, rows, W.device), store)
    if quantizer is not None:
        quantizer.prepare(W, peers)
    g = (quantizer.group or cols) if quantizer is not None else cols
    mask = torch.zeros_like(W, dtype=torch.bool)  # True = pruned
    params = None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # [R, b]
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = Hinv1.diagonal()  # [b]
        if prune_u:  # SparseGPT's adaptive mask selection, per row within the block: its k smallest scores
            k = (_pruned_before(sparsity, i2) - _pruned_before(sparsity, i1)).to(W.device)[:, None]
            order = torch.argsort(W1**2 / d[None, :] ** 2, dim=1, stable=True)
            ranks = torch.arange(i2 - i1, device=W.device)[None, :]
            mask[:, i1:i2].scatter_(1, order, ranks < k)
        for i in range(i2 - i1):
            col = i1 + i
            if m and i % m == 0:
                score = W1[:, i : i + m] ** 2 / d[None, i : i + m] ** 2  # [R, m]
                order = torch.argsort(score, dim=1, stable=True)
                mask[:, col : col + m].scatter_(1, order, slots < drop_nm)
            if quantizer is not None and col % g == 0:
                current = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :g]
                current = current.masked_fill(mask[:, col : col + current.shape[1]], 0)
                params = quantizer.params(current)
            w = W1[:, i]
            q = w.masked_fill(mask[:, col], 0)
            if quantizer is not None:
                q = quantizer.round(q[:, None], params)[:, 0].masked_fill(mask[:, col], 0)
            Q1[:, i] = q
            err = (w - q) / d[i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, (quantizer.stacked() if quantizer is not None else ())
