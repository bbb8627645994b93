"""Magnitude pruning: remove the weights of smallest |W| in each layer (no calibration data)."""

from __future__ import annotations

import torch

from allocator.backends.masks import prune_mask
from allocator.levels import Level


def magnitude_score(W: torch.Tensor, _stats=None) -> torch.Tensor:
    """|W|: what magnitude pruning removes the lowest of (one threshold for the whole layer)."""
    return W.abs().float()


def magnitude_prune(W: torch.Tensor, level: Level) -> torch.Tensor:
    """Return ``W`` ([rows, cols]) with the lowest-magnitude weights zeroed (layer-wise threshold)."""
    mask = prune_mask(magnitude_score(W), level, per_row=False)
    return W.masked_fill(mask, 0)
