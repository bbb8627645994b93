"""Calibration statistics of one linear layer's inputs, gathered batch by batch (sparsegpt's add_batch)."""

from __future__ import annotations

import torch


class LayerStats:
    """The input Gram matrix ``H = 2/n * X^T X`` over n calibration tokens (SparseGPT/GPTQ, eq. 1), Wanda's
    column norms ``||X_j||_2`` and the largest |x| seen (a calibrated activation scale).

    The column norms come from their own running sums of squares, not from H's diagonal, so a pass that needs no
    Hessian (Wanda, OWL's outlier ratios) skips the matmul and still gives the very same norms as one that does.
    Accumulated in float32 with a running mean, as in the reference implementations.
    """

    def __init__(self, cols: int, device: torch.device | str = "cpu", hessian: bool = True, keep: int = 0) -> None:
        self.H = torch.zeros(cols, cols, device=device) if hessian else None  # [cols, cols]
        self.sq = torch.zeros(cols, device=device)  # [cols] 2/n * sum of x_j^2
        self.absmax = torch.zeros((), device=device)
        self.keep, self.sample = keep, torch.zeros(0, cols, device=device)  # the first ``keep`` input rows
        self.n = 0

    def add_batch(self, X: torch.Tensor) -> None:
        """Fold in inputs ``X`` of shape [..., cols]."""
        X = X.reshape(-1, X.shape[-1]).float()  # [tokens, cols]
        t = X.shape[0]
        if len(self.sample) < self.keep:  # what activation quantization's error is measured on
            self.sample = torch.cat([self.sample, X[: self.keep - len(self.sample)]])
        self.absmax = torch.maximum(self.absmax, X.abs().max())
        keep = self.n / (self.n + t)
        self.n += t
        X = X * (2 / self.n) ** 0.5
        self.sq = self.sq * keep + (X * X).sum(0)
        if self.H is not None:
            self.H *= keep
            self.H += X.t() @ X

    @property
    def col_norms(self) -> torch.Tensor:
        """``||X_j||_2`` over all tokens seen, per input column (Wanda's activation norm)."""
        return (self.sq * self.n / 2).clamp(min=0).sqrt()
