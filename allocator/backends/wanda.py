"""Wanda (Sun et al. 2023): prune by |W_ij| * ||X_j||_2, comparing weights within each output row."""

from __future__ import annotations

import torch

from allocator.backends.masks import prune_mask
from allocator.backends.stats import LayerStats
from allocator.levels import Level


def wanda_score(W: torch.Tensor, stats: LayerStats) -> torch.Tensor:
    """|W_ij| * ||X_j||: what Wanda removes the lowest of, within each output row."""
    return W.abs().float() * stats.col_norms.to(W.device)[None, :]  # [rows, cols]


def wanda_prune(W: torch.Tensor, level: Level, stats: LayerStats) -> torch.Tensor:
    """Return ``W`` ([rows, cols]) with the lowest |W| * ||X|| weights of each row (or N:M group) zeroed."""
    return W.masked_fill(prune_mask(wanda_score(W, stats), level, per_row=True), 0)
