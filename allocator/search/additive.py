"""An additive model of the real model's KL, fitted to plans whose KL was measured (SPDY's idea).

A profile's per-(unit, level) numbers are priors measured one unit at a time. What a plan costs in
KL is not their plain sum: units interact and each prior is off by its own factor. So

    KL(plan) ≈ Σ_u w_u · prior[u, level_u],

with one weight per unit fitted by ridge regression (shrunk towards one shared scale, the strength
chosen by cross-validation) to the measured KL of random feasible plans near the budget, plus every plan
evaluated later. The model is linear in the weights, so it also fits *differences*: two plans scored on the
same tokens differ by Σ_u w_u · (prior[u, a_u] − prior[u, b_u]), and the noise the tokens share cancels
(guided evolution judges each child against its parent on fresh windows). The fitted costs
``w_u · prior[u, k]`` are what the knapsack then minimises; the fitted search
(:mod:`allocator.search.fitted`) alternates knapsack → measure → refit → re-solve.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.stats import spearmanr

from allocator.errors import AllocatorError

_MIN_PLANS = 10  # fewer measured plans than this: no fit (5-fold cross-validation needs two per fold)
_LAMBDAS = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # ridge strengths, relative to the mean diagonal of XᵀX


@dataclass
class AdditiveFit:
    """Per-unit weights on a prior matrix, and how well they predict plans they were not fitted on."""

    weights: np.ndarray  # [U], ≥ 0
    lam: float
    held_out: dict = field(default_factory=dict)  # spearman, r2 of k-fold predictions

    def costs(self, prior: np.ndarray) -> np.ndarray:
        """The fitted per-(unit, level) costs ([U, K]; +inf stays +inf)."""
        return prior * self.weights[:, None]


def _features(prior: np.ndarray, choices: np.ndarray) -> np.ndarray:
    return prior[np.arange(prior.shape[0])[None, :], choices]  # [P, U]


def _ridge(X: np.ndarray, y: np.ndarray, lam: float) -> np.ndarray:
    """argmin ‖y − Xw‖² + λ·m·‖w − s‖² with s the best single shared scale and m the mean diag of XᵀX."""
    s = float(X.sum(1) @ y / max(float(X.sum(1) @ X.sum(1)), 1e-300))
    G = X.T @ X
    m = max(float(np.trace(G)) / len(G), 1e-300)
    w = s + np.linalg.solve(G + lam * m * np.eye(len(G)), X.T @ (y - X.sum(1) * s))
    return np.clip(w, 0.0, None)


def fit(prior: np.ndarray, choices: np.ndarray, kl: np.ndarray, folds: int = 5, seed: int = 0,
        baseline: np.ndarray | None = None) -> AdditiveFit:  # fmt: skip
    """Fit per-unit weights to measured KL, choosing the ridge strength by k-fold cross-validation.

    ``baseline``: ``kl`` are differences, ``choices[i]``'s KL minus ``baseline[i]``'s on the same tokens."""
    choices, kl = np.asarray(choices), np.asarray(kl, dtype=float)
    if len(kl) < 2 * folds:
        raise AllocatorError(f"a fitted sensitivity needs at least {2 * folds} measured plans, got {len(kl)}")
    finite = np.where(np.isfinite(prior), prior, 0.0)
    X = _features(finite, choices) - (0.0 if baseline is None else _features(finite, np.asarray(baseline)))
    fold = np.random.default_rng(seed).permutation(len(kl)) % folds
    best = None
    for lam in _LAMBDAS:
        pred = np.empty_like(kl)
        for f in range(folds):
            train = fold != f
            pred[~train] = X[~train] @ _ridge(X[train], kl[train], lam)
        sse = float(((pred - kl) ** 2).sum())
        if best is None or sse < best[0]:
            best = (sse, lam, pred)
    sse, lam, pred = best
    r2 = 1 - sse / max(float(((kl - kl.mean()) ** 2).sum()), 1e-300)
    held_out = {
        "spearman": float(spearmanr(pred, kl).statistic),
        "r2": float(r2),
        "plans": int(len(kl)),
        "folds": folds,
    }
    return AdditiveFit(_ridge(X, kl, lam), lam, held_out)
