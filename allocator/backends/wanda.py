"""Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||_2, comparing weights within each output row."""

from __future__ import annotations

import torch

from allocator.backends.masks import prune_mask
from allocator.backends.stats import LayerStats
from allocator.levels import Level


def wanda_prune(W: torch.Tensor, level: Level, stats: LayerStats) -> torch.Tensor:
    """Return ``W`` ([rows, cols]) with the lowest |W| * ||X|| weights of each row (or N:M group) zeroed."""
    score = W.abs().float() * stats.col_norms.to(W.device)[None, :]  # [rows, cols]
    return W.masked_fill(prune_mask(score, level, per_row=True), 0)
