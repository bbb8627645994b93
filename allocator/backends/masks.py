"""Pruning masks with exactly the density a level promises."""

from __future__ import annotations

import torch

from allocator.levels import Level


def prune_mask(score: torch.Tensor, level: Level, per_row: bool) -> torch.Tensor:
    """Boolean ``[rows, cols]`` mask of the weights to remove: the lowest ``score`` ones.

    N:M removes the m-n lowest of every m consecutive inputs in each row. Unstructured removes
    ``level.pruned_per_row(cols)`` per row (``per_row``, Wanda's comparison group) or the same
    total anywhere in the layer (magnitude's layer-wise threshold). Ties break by index, so the
    count is exact.
    """
    rows, cols = score.shape
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device)
    if level.prune is not None and level.prune.nm is not None:
        n, m = level.prune.nm
        groups = score.reshape(rows, cols // m, m)  # [rows, groups, m]
        drop = torch.topk(groups, m - n, dim=-1, largest=False).indices
        return mask.view(rows, cols // m, m).scatter_(-1, drop, True).view(rows, cols)
    k = level.pruned_per_row(cols)
    if k == 0:
        return mask
    if per_row:
        return _lowest(score, k)
    return _lowest(score.reshape(1, -1), k * rows).view(rows, cols)


def _lowest(score: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the ``k`` lowest entries of each row of ``score`` ([r, c]); ties at the threshold by index.

    A k-th-value threshold instead of ``topk(k)``: about 4× faster on a CPU for k near c/2.
    """
    threshold = torch.kthvalue(score, k, dim=1, keepdim=True).values  # [r, 1]
    below = score < threshold
    tied = score == threshold
    need = k - below.sum(dim=1, keepdim=True)  # ties to take, in index order, to remove exactly k
    return below | (tied & (tied.cumsum(dim=1) <= need))
