"""Calibration statistics of one linear layer's inputs, gathered batch by batch (sparsegpt's add_batch)."""

from __future__ import annotations

import torch


class LayerStats:
    """The input Gram matrix ``H = 2/n * X^T X`` over n calibration tokens (SparseGPT/GPTQ, eq. 1).

    Wanda's column norms ``||X_j||_2`` are ``sqrt(n/2 * diag(H))``, so one statistic serves every
    backend. Accumulated in float32 with a running mean, as in the reference implementations.
    """

    def __init__(self, cols: int, device: torch.device | str = "cpu") -> None:
        self.H = torch.zeros(cols, cols, device=device)  # [cols, cols]
        self.n = 0

    def add_batch(self, X: torch.Tensor) -> None:
        """Fold in inputs ``X`` of shape [..., cols]."""
        X = X.reshape(-1, X.shape[-1]).float()  # [tokens, cols]
        t = X.shape[0]
        self.H *= self.n / (self.n + t)
        self.n += t
        X = X * (2 / self.n) ** 0.5
        self.H += X.t() @ X

    @property
    def col_norms(self) -> torch.Tensor:
        """``||X_j||_2`` over all tokens seen, per input column (Wanda's activation norm)."""
        return (self.H.diagonal() * self.n / 2).clamp(min=0).sqrt()
