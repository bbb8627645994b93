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
    if level.m:
        groups = score.reshape(rows, cols // level.m, level.m)  # [rows, groups, m]
        drop = torch.topk(groups, level.m - level.n, dim=-1, largest=False).indices
        return mask.view(rows, cols // level.m, level.m).scatter_(-1, drop, True).view(rows, cols)
    k = level.pruned_per_row(cols)
    if k == 0:
        return mask
    if per_row:
        return mask.scatter_(1, torch.topk(score, k, dim=1, largest=False).indices, True)
    flat = mask.view(-1)
    flat[torch.topk(score.flatten(), k * rows, largest=False).indices] = True
    return mask
