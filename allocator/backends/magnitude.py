"""Magnitude pruning: remove the weights of smallest |W| in each layer (no calibration data)."""

from __future__ import annotations

import torch

from allocator.backends.masks import prune_mask
from allocator.levels import Level


def magnitude_prune(W: torch.Tensor, level: Level) -> torch.Tensor:
    """Return ``W`` ([rows, cols]) with the lowest-magnitude weights zeroed (layer-wise threshold)."""
    mask = prune_mask(W.abs().float(), level, per_row=False)
    return W.masked_fill(mask, 0)
