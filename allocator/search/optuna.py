"""Bayesian and multi-objective allocation search with Optuna, over a storage several workers share.

Two search spaces (``space``):

* ``levels``: one categorical level per unit. A proposal that breaks the budget is projected onto
  it deterministically (``project``): units step to their next more compressed level, cheapest
  profile error per cost saved first, until every budget holds; single-objective studies then
  spend leftover slack on the steps that buy the most error per cost.
* ``compact``: a handful of continuous knobs, a log-multiplier per layer role and a depth slope,
  that re-weight the profile errors; the knapsack (its DP for one budget, the MILP for several)
  turns the re-weighted profile into a plan within the budget. Small enough for GP and CMA-ES.

The study is seeded with the uniform, OWL and knapsack plans (``enqueue_trial`` in the levels
space; the compact space's origin *is* the knapsack plan, the others are scored once and kept beside
the trials), so its best plan is never worse than the best seed on the same fitness. Several processes pointed
at one storage (a journal file, or any RDB URL) share one study: trial numbers are handed out by
the storage, and a trial numbered at or beyond the study's quota is pruned unevaluated, so the
workers finish exactly ``trials`` evaluations between them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np
from tqdm.auto import tqdm

from allocator.budget import Problem, ceiling
from allocator.errors import AllocatorError
from allocator.search.base import SearchContext, Searcher, SearchResult, at_least, one_of, option
from allocator.search.knapsack import Knapsack, frontier
from allocator.search.owl import OWL
from allocator.search.repair import project
from allocator.search.study import (
    OVER_QUOTA,
    PLAN,
    REPEAT,
    earlier_evaluations,
    evaluated,
    heartbeat,
    in_flight,
    open_storage,
    recover_stale,
    repeat_of,
    setup_lock,
    study_result,
    study_trials_done,
    tell,
    trial_seeded,
)
from allocator.search.trust import check_pickled_state
from allocator.search.uniform import Uniform

log = logging.getLogger(__name__)

SAMPLERS = ("tpe", "gp", "cmaes", "nsga2")
SPACES = ("levels", "compact")
OBJECTIVES = ("fitness", "fitness,bytes", "fitness,latency")


def _sampler(name: str, seed: int):
    """Optuna's sampler ``name``. CMA-ES keeps its state pickled in the study storage, so it runs only studies this
    process created: resuming one (``--resume``, a second worker) is refused (:mod:`allocator.search.trust`)."""
    import optuna

    made = {"tpe": optuna.samplers.TPESampler, "gp": optuna.samplers.GPSampler, "nsga2": optuna.samplers.NSGAIISampler}
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False)
    return made[name](seed=seed)


def unit_features(problem: Problem) -> tuple[list[str], np.ndarray]:
    """Per unit: its role (layer names without the block) and its relative depth in [0, 1]."""
    roles = ["+".join(n.rsplit(".", 1)[-1] for n in unit) for unit in problem.units]
    d = np.zeros(len(problem.units)) if problem.blocks is None else problem.blocks.astype(float)
    return roles, (d - d.min()) / max(1.0, d.max() - d.min())


@dataclass
class OptunaSearch(Searcher):
    """An Optuna study over allocations; ``objectives``: ``fitness``, or a Pareto front of ``fitness,bytes``
    or ``fitness,latency`` (the latter priced by a latency table, see :mod:`allocator.latency`)."""

    name = "optuna"
    space: str = option("levels", "optuna: search space (one level per unit, or a few knobs)", choices=SPACES)
    sampler: str = option("tpe", "optuna: sampler (cmaes resumes only studies this process made)", choices=SAMPLERS)
    trials: int = option(100, "optuna: model evaluations in the study (all workers)")
    objectives: str = option("fitness", "optuna: fitness,bytes or fitness,latency gives a Pareto front of plans",
                             choices=OBJECTIVES)  # fmt: skip
    storage: str | None = option(None, "optuna: journal file or RDB URL; workers on one storage share a study "
                                 "(default: a journal in the output folder)", kind=str)  # fmt: skip
    study_name: str = option("allocator", "optuna: study name within the storage")
    seeds: str = option("uniform,owl,knapsack", "optuna: methods whose plans are the first trials")
    probe: int = option(8, "optuna: calibration windows every trial is scored on (the same ones)")
    heartbeat: float = option(10.0, "optuna: seconds between a running trial's signs of life (6x silent: recovered)")

    def __post_init__(self) -> None:  # refused when the searcher is made, before any model work
        one_of("--space", self.space, SPACES)
        one_of("--sampler", self.sampler, SAMPLERS)
        one_of("--objectives", self.objectives, OBJECTIVES)
        at_least("--trials", self.trials, 1)
        at_least("--probe", self.probe, 1)
        if not self.heartbeat > 0:
            raise AllocatorError(f"--heartbeat must be > 0 seconds, got {self.heartbeat}")
        if self.sampler == "cmaes" and self.space != "compact":
            raise AllocatorError("CMA-ES samples continuous spaces only: use --space compact (or sampler tpe/gp)")
        if self.sampler == "cmaes" and "," in self.objectives:
            raise AllocatorError("CMA-ES is single-objective: use sampler nsga2 or tpe for a Pareto front")
        unknown = sorted(set(self.seeds.split(",")) - {"", "uniform", "owl", "knapsack"})
        if unknown:
            raise AllocatorError(f"unknown --seeds {unknown}: choose from uniform, owl, knapsack")

    def check(self) -> None:
        """A storage URL that cannot be opened is refused before any model work."""
        if self.storage:
            open_storage(self.storage)

    def needs(self) -> frozenset[str]:
        """The real model's fitness, a profile (repairs and seeds), and a latency table for a latency front."""
        return frozenset({"fitness", "profile"} | ({"latency"} if self.objectives.endswith("latency") else set()))

    def search(self, problem: Problem, ctx: SearchContext) -> SearchResult:
        """Run (or join, or resume) the study; return the best plan found within the budget.

        The study lives in ``storage``, else in a journal in ``ctx.workdir``, else in memory.
        """
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        objectives = self.objectives.split(",")
        multi = len(objectives) > 1
        second = problem.objective(objectives[1]) if multi else None
        if problem.sensitivity is None:
            raise AllocatorError("optuna repairs proposals by a sensitivity profile: run with a profile")
        if (error := problem.reach_error()) is not None:
            raise error
        seed = ctx.seed
        score = self._scorer(problem, ctx)
        sampler = trial_seeded(lambda s: _sampler(self.sampler, s), seed)
        bytes_cost = problem.bytes_cost if problem.bytes_cost is not None else problem.cost
        storage = self.storage or (str(ctx.workdir / "optuna.journal") if ctx.workdir else None)
        with setup_lock(storage):  # one worker at a time creates, checks and seeds the study
            backend = open_storage(storage)
            check_pickled_state(backend, storage, self.study_name, self.sampler)  # before any pickle is read
            study = optuna.create_study(study_name=self.study_name, storage=backend,
                                        sampler=sampler, directions=["minimize"] * len(objectives),
                                        load_if_exists=True)  # fmt: skip
            key = {"units": len(problem.units), "levels": [lv.name for lv in problem.levels], "limit": problem.limit,
                   "space": self.space, "objectives": self.objectives}  # fmt: skip
            if study.user_attrs.get("key", key) != key:
                raise AllocatorError(f"study {self.study_name!r} in {storage} belongs to another search: "
                                     "use another --study-name or output folder")  # fmt: skip
            study.set_user_attr("key", key)
            if ctx.resume:  # the only worker left: re-queue every RUNNING trial at once (else after the grace)
                recover_stale(study, None)
            if not study.user_attrs.get("seeded"):  # again after a kill during seeding: queued seeds are skipped
                self._seed(study, problem, seed, score, bytes_cost)
                study.set_user_attr("seeded", True)
        roles, depth = unit_features(problem)

        def evaluate(trial) -> tuple[float, ...] | float:
            t0 = time.perf_counter()
            proposal = self._propose(trial, problem, roles, depth)
            choice = project(problem, proposal, fill=not multi) if self.space == "levels" else proposal
            plan = [problem.levels[k].name for k in choice]
            trial.set_user_attr(PLAN, plan)  # claimed before it is evaluated: other workers leave it alone
            if (other := repeat_of(study, trial.number, plan)) is not None:
                trial.set_user_attr(REPEAT, other.number)
                if other.values is None:  # another worker is evaluating it now
                    raise optuna.TrialPruned(f"trial {other.number} is evaluating this plan")
                self._record(trial, problem, choice, other.user_attrs["fitness"], bytes_cost, 0.0)
                return tuple(other.values) if multi else other.values[0]
            fit = score(choice)
            self._record(trial, problem, choice, fit, bytes_cost, time.perf_counter() - t0)
            return (fit, problem.summed(second, choice)) if multi else fit

        repeats = 0  # proposals in a row that the study had already evaluated: the space is exhausted
        with tqdm(total=self.trials, initial=evaluated(study), desc=f"optuna ({self.space})", leave=False) as bar:
            while (done := evaluated(study)) < self.trials and repeats < max(50, self.trials):
                bar.n = done
                bar.refresh()
                recover_stale(study, 6 * self.heartbeat)
                if done + in_flight(study) >= self.trials:  # other workers hold the rest of the quota
                    time.sleep(min(1.0, self.heartbeat))
                    continue
                trial = study.ask()
                if earlier_evaluations(study, trial.number) >= self.trials:
                    trial.set_user_attr(OVER_QUOTA, True)
                    tell(study, trial, state=optuna.trial.TrialState.PRUNED)
                    continue
                with heartbeat(trial, self.heartbeat):
                    try:
                        values = evaluate(trial)
                    except optuna.TrialPruned:
                        tell(study, trial, state=optuna.trial.TrialState.PRUNED)
                        repeats += 1
                        continue
                    except Exception:
                        tell(study, trial, state=optuna.trial.TrialState.FAIL)
                        raise
                    tell(study, trial, values)
                repeats = repeats + 1 if REPEAT in trial.user_attrs else 0
        if repeats:
            log.info("optuna: %d proposals in a row repeated evaluated plans; stopping", repeats)
        if not study_trials_done(study):
            raise AllocatorError(f"study {self.study_name!r} in {storage} has no finished trial")
        return study_result(study, problem, self.objectives if multi else "")

    # ---- pieces ----------------------------------------------------------------------------------
    def _scorer(self, problem: Problem, ctx: SearchContext):
        """Fitness on fixed pool rows (comparable across trials)."""
        fitness = ctx.fitness
        if fitness is None:
            raise AllocatorError("optuna needs a fitness on the real model (a level database and calibration data)")
        batch = np.arange(min(self.probe, fitness.pool_size))
        state = {"parent": False}

        def score(choice: np.ndarray) -> float:
            if not state["parent"] and hasattr(fitness, "set_parent"):
                fitness.set_parent(choice)  # the incremental cache needs a parent; any plan will do
                state["parent"] = True
            return float(fitness(choice, batch))

        return score

    def _propose(self, trial, problem: Problem, roles: list[str], depth: np.ndarray) -> np.ndarray:
        if self.space == "levels":
            names = [lv.name for lv in problem.levels]
            picks = []
            for u, unit in enumerate(problem.units):
                choices = [names[k] for k in np.flatnonzero(np.isfinite(problem.cost[u]))]
                picks.append(names.index(trial.suggest_categorical(unit[0], choices)))
            return np.array(picks)

        mult = {r: trial.suggest_float(f"role.{r}", -2.0, 2.0) for r in dict.fromkeys(roles)}
        slope = trial.suggest_float("depth_slope", -2.0, 2.0)
        weight = np.exp(np.array([mult[r] for r in roles]) + slope * (depth - 0.5))
        shaped = replace(problem, sensitivity=problem.sensitivity * weight[:, None])
        if problem.extra:  # several budgets: the exact MILP
            return Knapsack().search(shaped).choice
        # one budget: the knapsack's DP (deterministic, a fraction of a second; the MILP on re-weighted
        # errors took up to 40 s per trial), then the slack its cost rounding leaves is spent greedily
        point = frontier(shaped, [problem.limit], buckets=20_000)[0]
        return project(shaped, point.choice)

    def _record(self, trial, problem: Problem, choice, fit: float, bytes_cost, seconds: float) -> None:
        """Plan, budget, fitness and timing as user attributes (what optuna-dashboard shows)."""
        achieved = [problem.summed(c, choice) for _, c, _ in problem.constraints()]
        for (budget, _, limit), total in zip(problem.constraints(), achieved, strict=True):
            # the same tolerance as Problem.feasible: a plan exactly at the limit is feasible for the study too
            if hasattr(trial, "set_constraint"):  # Optuna >= 5; on 4.x the margin is kept as an attribute
                trial.set_constraint(str(budget), total - ceiling(limit))
            else:
                trial.set_user_attr(f"constraint {budget}", total - ceiling(limit))
        trial.set_user_attr("budget", str(problem.budget))
        trial.set_user_attr("achieved", problem.in_budget_units(problem.budget, achieved[0]))
        trial.set_user_attr("bytes", problem.summed(bytes_cost, choice))
        trial.set_user_attr("fitness", fit)
        trial.set_user_attr("seconds", seconds)

    def _seed(self, study, problem: Problem, seed: int, score, bytes_cost) -> None:
        """Queue the baseline plans (first trials, so the study starts at least as good as they are)."""
        plans = {}
        for name in [s for s in self.seeds.split(",") if s]:
            try:
                plans[name] = _baseline(name, problem, seed)
            except AllocatorError as exc:
                log.info("seed %s skipped: %s", name, exc)
        for name, plan in plans.items():
            if self.space == "levels":
                study.enqueue_trial({u[0]: problem.levels[k].name for u, k in zip(problem.units, plan, strict=True)},
                                    user_attrs={"seed": name}, skip_if_exists=True)  # fmt: skip
            elif name == "knapsack":
                study.enqueue_trial({p: 0.0 for p in self._compact_params(problem)}, user_attrs={"seed": name},
                                    skip_if_exists=True)  # fmt: skip
            elif name not in study.user_attrs.get("baselines", {}):  # not expressible as knobs: kept beside
                fit = score(plan)
                baselines = dict(study.user_attrs.get("baselines", {}))
                baselines[name] = {"plan": [problem.levels[k].name for k in plan], "fitness": fit,
                                   "bytes": problem.summed(bytes_cost, plan)}  # fmt: skip
                study.set_user_attr("baselines", baselines)

    def _compact_params(self, problem: Problem) -> list[str]:
        roles, _ = unit_features(problem)
        return [f"role.{r}" for r in dict.fromkeys(roles)] + ["depth_slope"]


def _baseline(name: str, problem: Problem, seed: int) -> np.ndarray:
    """A baseline method's plan (uniform, OWL, knapsack), refused where it lacks what it needs or breaks a budget."""
    searcher = {"uniform": Uniform, "owl": OWL, "knapsack": Knapsack}[name]()
    have = {"profile": problem.sensitivity is not None, "outliers": problem.outlier_ratio is not None}
    if not all(have.get(need, False) for need in searcher.needs()):
        raise AllocatorError(f"{name} needs {sorted(searcher.needs())}")
    choice = np.asarray(searcher.search(problem, SearchContext(seed)).choice, dtype=int)
    if not problem.feasible(choice):
        raise AllocatorError(f"{name}'s plan breaks a budget")
    return choice
