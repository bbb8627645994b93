"""An additive model of the real model's KL, fitted to plans whose KL was measured (SPDY's idea).

A profile's per-(unit, level) numbers are priors measured one unit at a time. What a plan costs in
KL is not their plain sum: units interact and each prior is off by its own factor. So

    KL(plan) ≈ Σ_u w_u · prior[u, level_u],

with one weight per unit fitted by ridge regression (shrunk towards one shared scale, the strength
chosen by cross-validation) to the measured KL of random feasible plans near the budget, plus every plan
evaluated later. The fitted costs ``w_u · prior[u, k]`` are what the knapsack then minimises;
:func:`refine` alternates knapsack → measure → refit → re-solve (a cheap model-based search).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import spearmanr

from allocator.budget import Problem
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


def fit(prior: np.ndarray, choices: np.ndarray, kl: np.ndarray, folds: int = 5, seed: int = 0) -> AdditiveFit:
    """Fit per-unit weights to measured KL, choosing the ridge strength by k-fold cross-validation."""
    choices, kl = np.asarray(choices), np.asarray(kl, dtype=float)
    if len(kl) < 2 * folds:
        raise AllocatorError(f"a fitted sensitivity needs at least {2 * folds} measured plans, got {len(kl)}")
    X = _features(np.where(np.isfinite(prior), prior, 0.0), choices)
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


def random_plans(
    problem: Problem, start: np.ndarray, n: int, seed: int, steps: tuple[int, int] = (4, 40)
) -> np.ndarray:
    """Up to ``n`` distinct feasible plans, each ``start`` after a random number of budget-keeping level switches."""
    from allocator.search.evolution import mutate
    from allocator.search.repair import level_ladders

    rng = np.random.default_rng(seed)
    ladders, plans, seen = level_ladders(problem), [], {start.tobytes()}
    for _ in range(50 * n):
        if len(plans) == n:
            break
        plan = start.copy()
        for _ in range(int(rng.integers(steps[0], steps[1] + 1))):
            plan = mutate(problem, plan, ladders, rng) if plan is not None else None
        if plan is not None and plan.tobytes() not in seen:
            seen.add(plan.tobytes())
            plans.append(plan)
    return np.array(plans, dtype=int).reshape(len(plans), len(start))  # fewer than n where the grid allows no more


def refine(
    problem: Problem,
    prior: np.ndarray,
    measure: Callable[[np.ndarray], float],
    solve: Callable[[np.ndarray], np.ndarray],
    start: np.ndarray,
    plans: int = 48,
    rounds: int = 4,
    per_round: int = 4,
    seed: int = 0,
) -> tuple[AdditiveFit, dict]:
    """Fit on ``plans`` random plans around ``start``, then ``rounds`` × (solve → measure the solution and
    ``per_round`` − 1 of its neighbours → refit).

    Every solution is measured, the plain prior's (weights 1, round -1) included, and the fit whose
    solution measured the lowest KL is returned: a fit made from plans far from the optimum (e.g.
    around a catastrophic uniform plan) can mislead the solver, and then the prior's own plan wins.
    Returns that fit and a record of every plan and round.
    """
    from allocator.search.evolution import mutate
    from allocator.search.repair import level_ladders

    measured: dict[bytes, tuple[np.ndarray, float]] = {}

    def score(choice: np.ndarray) -> float:
        if choice.tobytes() not in measured:
            measured[choice.tobytes()] = (choice, float(measure(choice)))
        return measured[choice.tobytes()][1]

    def refit() -> AdditiveFit:
        choices, kl = zip(*measured.values(), strict=True)
        if len(kl) < _MIN_PLANS:  # a grid or budget with too few distinct plans: the prior as it is
            return AdditiveFit(np.ones(prior.shape[0]), 0.0, {"plans": len(kl), "note": "too few plans to fit"})
        return fit(prior, np.array(choices), np.array(kl), seed=seed)

    for choice in [start, *random_plans(problem, start, plans - 1, seed)]:
        score(choice)
    model = AdditiveFit(np.ones(prior.shape[0]), 0.0, {"note": "the prior itself"})
    history: list[dict] = []
    best: tuple[float, int, AdditiveFit] | None = None  # (measured KL of the solution, round, fit)
    rng, ladders = np.random.default_rng(seed + 1), level_ladders(problem)
    for r in range(-1, rounds + 1):
        if r >= 0:
            model = refit()
        try:
            proposal = solve(model.costs(prior))
        except AllocatorError as exc:  # e.g. a limit no MILP point meets within its safety margin
            history.append({"round": r, "plans": len(measured), "stopped": str(exc)})
            break
        proposal_kl = score(proposal)
        history.append({"round": r, "plans": len(measured), **model.held_out, "proposal_kl": proposal_kl})
        if best is None or proposal_kl < best[0]:
            best = (proposal_kl, r, model)
        for _ in range(per_round - 1 if 0 <= r < rounds else 0):  # neighbours of the fits' solutions
            child = mutate(problem, proposal, ladders, rng)
            if child is not None:
                score(child)
    chosen = model if best is None else best[2]
    choices, kl = zip(*measured.values(), strict=True)
    fits = [h for h in history if "spearman" in h]  # how well the last fit predicts plans it did not see
    record = {"history": history, "chosen_round": None if best is None else best[1],
              "held_out": {k: fits[-1][k] for k in ("spearman", "r2", "plans", "folds")} if fits else {},
              "choices": np.array(choices).tolist(), "kl": list(kl)}  # fmt: skip
    return chosen, record
