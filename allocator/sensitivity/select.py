"""Turn a profile into the error matrix a searcher minimises, for the chosen sensitivity.

``error`` and ``fisher`` are columns of every profile. ``kl`` is measured once per profile (only one
layer compressed at a time, from the level database) and saved into it. ``fitted`` fits per-unit
weights on a prior (``--fit-prior``: ``kl``, or ``fisher``; ``auto`` takes ``kl`` where the profile has
it or the model is on a GPU, where measuring it takes about a minute for SmolLM2) to the measured KL of
real plans near this run's budget (:func:`allocator.sensitivity.fitted.refine`), so it is measured per run, not cached.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from allocator import artifacts
from allocator.budget import Problem
from allocator.errors import AllocatorError
from allocator.fitness import KLFitness
from allocator.profile import Profile
from allocator.sensitivity import SENSITIVITIES
from allocator.sensitivity.fitted import refine

log = logging.getLogger(__name__)


def sensitivity_matrix(session, profile: Profile, problem: Problem, backend: str, kind: str) -> tuple[np.ndarray, dict]:
    """The [U, K] matrix of ``kind`` for ``problem``'s units and levels, and a record of how it was made."""
    if kind not in SENSITIVITIES:
        raise AllocatorError(f"unknown --sensitivity {kind!r}: choose one of {', '.join(SENSITIVITIES)}")
    cfg = session.config
    if kind == "kl":
        artifacts.ensure_kl(session, profile, problem.levels, backend, cfg.fit_seqs)
        return profile.error_matrix(problem.units, problem.levels, "kl"), {"kl_tokens": profile.meta["kl_tokens"]}
    if kind != "fitted":
        return profile.error_matrix(problem.units, problem.levels, kind), {}
    from allocator.search import make_searcher
    from allocator.search.uniform import Uniform

    prior_kind = cfg.fit_prior
    if prior_kind == "auto":  # the per-layer KL ranks plans better; measuring it is cheap on a GPU only
        prior_kind = "kl" if "kl" in profile.table or session.model.device.type == "cuda" else "fisher"
    if prior_kind == "kl":
        artifacts.ensure_kl(session, profile, problem.levels, backend, cfg.fit_seqs)
    prior = profile.error_matrix(problem.units, problem.levels, prior_kind)
    db = artifacts.database(session, problem.levels, backend)
    seqs = session.calib[: cfg.fit_seqs]
    fitness = KLFitness(session.model, session.inventory, problem, db, seqs, cfg.batch_size)
    rows = np.arange(len(seqs))

    knapsack = make_searcher("knapsack", cfg.options)

    def solve(costs: np.ndarray) -> np.ndarray:
        return knapsack.search(problem.with_profile(costs)).choice

    start = Uniform.choice(problem)
    fitness.set_parent(start)
    t0 = time.perf_counter()
    model, record = refine(problem, prior, lambda c: fitness(c, rows), solve, start, plans=cfg.fit_plans,
                           rounds=cfg.fit_rounds, seed=cfg.seed)  # fmt: skip
    record = {**record, "prior": prior_kind, "fit_s": time.perf_counter() - t0, "weights": model.weights.tolist(),
              "lam": model.lam, "kl_tokens": int(seqs.numel())}  # fmt: skip
    log.info("fitted sensitivity (%s prior): held-out %s, round %s chosen", prior_kind, record["held_out"],
             record["chosen_round"])  # fmt: skip
    return model.costs(prior), record
