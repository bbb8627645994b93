"""The main job end to end: measure what the method needs, allocate under a budget, compress, evaluate, write.

A run measures only what its searcher declares (:attr:`allocator.spec.RunSpec.needs`): uniform nothing, OWL one
outlier pass, knapsack a profile (and, for the fitted sensitivity, a GPU run's default, the level database and
the measured plans of the fitted search), evolution the level database and the KL fitness.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from allocator.about import versions
from allocator.backends.database import LevelDatabase
from allocator.budget import Problem, build_problem
from allocator.fitness import KLFitness
from allocator.io import write_json_atomic
from allocator.plan import Plan
from allocator.profile import Profile
from allocator.report import write_history, write_pareto
from allocator.search import Allocation, SearchContext, Searcher, allocate
from allocator.session import Session
from allocator.spec import RunConfig, RunSpec, resolve
from allocator.tasks import parse_tasks, task_accuracy

log = logging.getLogger(__name__)
KL_AUTO_S = 120.0  # the longest the ``auto`` prior spends measuring the per-layer KL (SmolLM2's 19 levels: ~1 min)


@dataclass
class RunResult:
    """What a run produced: the plan and its metrics (also written to the output folder)."""

    plan: Plan
    metrics: dict = field(default_factory=dict)
    output_dir: Path | None = None


def run(spec: RunSpec | RunConfig, session: Session | None = None, observer=None) -> RunResult:
    """Allocate, compress and evaluate as ``spec`` says (settings are resolved first); write plan.json,
    metrics.json, config.json.

    Nothing is written unless the run succeeds. A ``session`` loaded with the same model and data is reused
    (``allocator compare`` runs many plans on one); the model is left compressed to the plan. ``observer``: see
    :class:`allocator.search.SearchContext`.
    """
    spec = resolve(spec) if isinstance(spec, RunConfig) else spec
    config = spec.config
    out = Path(config.output_dir) if config.output_dir else None
    session = session or Session(config)
    allocation: Allocation | None = None
    problem, record, db, over_budget = None, None, None, []
    if spec.saved is not None:
        spec.saved.check_against(session.inventory)
        over_budget = spec.saved.check_budget(f"plan {config.plan}", config.allow_over_budget, spec.latency)
        assignment, method = spec.saved.assignment, f"plan:{spec.saved.method}"
    else:
        problem = build_problem(session.inventory, list(spec.grid), spec.budget, config.per, list(spec.budgets[1:]),
                                spec.latency)  # fmt: skip
        problem, fitness, db, record = prepare(spec, session, problem)
        pool = spec.searcher.fitness_pool(config.fit_seqs)  # its first windows are where the fitted search measured
        shared = (pool is None or pool >= config.fit_seqs) and record and "kl" in record
        measured = tuple(zip(record["choices"], record["kl"], strict=True)) if shared else ()  # one history
        ctx = SearchContext(config.seed, fitness, out, config.resume, measured, observer)
        allocation = allocate(problem, spec.searcher, ctx)
        assignment, method = allocation.assignment, config.method
    grid = list(spec.saved.grid if spec.saved is not None else spec.grid)
    stored = session.find_database(grid, spec.backend.name)  # the weights the search measured, decoded
    metrics = {"budget": str(spec.budget), "method": method, **session.evaluate(assignment, spec.backend.name, stored)}
    if config.tasks:  # downstream accuracy of the model as it is now: compressed to the plan
        t0 = time.perf_counter()
        metrics["tasks"] = task_accuracy(session.model, session.loaded.tokenizer, parse_tasks(config.tasks),
                                         config.batch_size, config.tasks_limit)  # fmt: skip
        metrics["timings"]["tasks_s"] = time.perf_counter() - t0
    if over_budget:  # accepted only with --allow-over-budget: say so where the figures are
        metrics["over_budget"] = over_budget
    if record is not None:
        metrics["sensitivity"] = {"kind": config.sensitivity, **{k: v for k, v in record.items()
                                                                 if k not in ("choices", "kl", "weights")}}  # fmt: skip
    if allocation is not None and allocation.stats:
        metrics["search"] = allocation.stats
    if spec.latency is not None:
        metrics["latency"] = {**spec.latency.table.predict(assignment, session.inventory, spec.latency.tokens),
                              "table": config.latency_table}  # fmt: skip
    metrics["timings"]["search_s"] = allocation.search_s if allocation is not None else 0.0
    plan = plan_of(spec, session, assignment, method, metrics["timings"])
    if out is not None:
        if allocation is not None and allocation.history:
            write_history(allocation.history, out)
        if allocation is not None and allocation.front:
            _write_pareto(allocation.front, problem, session, spec, out, db)
        write_json_atomic(out / "config.json", {**asdict(config), "versions": versions()})
        if record:
            write_json_atomic(out / "sensitivity.json", record)
        if allocation is not None and allocation.record:  # e.g. every plan the fitted search measured
            write_json_atomic(out / "search.json", allocation.record)
        plan.save(out / "plan.json")
        write_json_atomic(out / "metrics.json", metrics)
    return RunResult(plan, metrics, out)


def prepare(spec: RunSpec, session: Session, problem: Problem) -> tuple[Problem, KLFitness | None, LevelDatabase | None,
                                                                          dict | None]:  # fmt: skip
    """Measure what the searcher needs, nothing more: the problem with its error matrix (and outlier ratios),
    the KL fitness, the level database, and the record of how the sensitivity was made (None if none was)."""
    needs, grid, backend = spec.needs, list(spec.grid), spec.backend.name
    record = None
    if "profile" in needs:
        profile = session.profile(grid, backend, with_database="database" in needs)
        error, record = _sensitivity(spec, session, profile, problem, spec.sensitivity)
        problem = problem.with_sensitivity(error, profile.outlier_ratio(problem.units))
    elif "outliers" in needs:
        problem = problem.with_outliers(session.outlier_ratios(list(problem.units)))
    fitness = db = None
    if "fitness" in needs:
        fitness, db = _fitness(spec, session, problem, spec.searcher)
    return problem, fitness, db, record


def _fitness(spec: RunSpec, session: Session, problem: Problem, searcher: Searcher) -> tuple[KLFitness, LevelDatabase]:
    """KL to dense over the level database, on the calibration windows ``searcher`` scores on."""
    db = session.database(list(spec.grid), spec.backend.name)
    pool = searcher.fitness_pool(spec.config.fit_seqs)
    seqs = session.calib if pool is None else session.calib[:pool]
    return KLFitness(session.model, session.inventory, problem, db, seqs, spec.config.batch_size), db


def _sensitivity(spec: RunSpec, session: Session, profile: Profile, problem: Problem,
                 kind: str) -> tuple[np.ndarray, dict]:  # fmt: skip
    """The [U, K] matrix of ``kind`` for ``problem``: a profile column (``auto``: the per-layer KL where it is
    measured or cheap, on a GPU, else the Fisher-weighted error), or the fitted search's costs."""
    grid, backend = list(spec.grid), spec.backend.name
    if kind == "auto":
        kind = _auto(session, profile, grid, backend)
    if kind == "kl":
        session.add_kl(profile, grid, backend)
        return profile.error_matrix(problem.units, problem.levels, "kl"), {"kl_tokens": profile.meta["kl_tokens"]}
    if kind != "fitted":
        return profile.error_matrix(problem.units, problem.levels, kind), {}
    fitter = spec.fitter
    kind = fitter.sensitivity(kind)
    kind = _auto(session, profile, grid, backend) if kind == "auto" else kind
    prior, _ = _sensitivity(spec, session, profile, problem, kind)
    problem = problem.with_sensitivity(prior)
    fitness, _ = _fitness(spec, session, problem, fitter)
    out = Path(spec.config.output_dir) if spec.config.output_dir else None
    found = allocate(problem, fitter, SearchContext(spec.config.seed, fitness, out, spec.config.resume))
    return found.costs, {**found.record, "prior": kind}


def _auto(session: Session, profile: Profile, grid: list, backend: str) -> str:
    """``auto``'s prior: the per-layer KL if the profile has it, or on a GPU where measuring it takes at most
    ``KL_AUTO_S`` (an 8B model's 2,000 entries take minutes), else the Fisher-weighted error."""
    on_gpu = session.model.device.type == "cuda"
    measured = "kl" in profile.table or (on_gpu and session.add_kl(profile, grid, backend, limit_s=KL_AUTO_S))
    return "kl" if measured else "fisher"


def plan_of(spec: RunSpec, session: Session, assignment: dict, method: str, timings: dict) -> Plan:
    """The run's plan, with what made it: backend and its settings, format, data (schema 2: self-contained)."""
    cfg = spec.config
    data = {**session.calib_meta, "bos_per_window": session.bos is not None, "eval": cfg.eval or "wikitext-2-test",
            "kl_samples": cfg.kl_samples, "eval_samples": cfg.eval_samples}  # fmt: skip
    backend = {"name": spec.backend.name, "batch_size": cfg.batch_size, "dtype": cfg.dtype, "device": cfg.device,
               "sequential": cfg.sequential}  # fmt: skip
    return Plan.create(assignment, session.inventory, session.loaded.model_id, spec.budget, list(spec.grid), method,
                       cfg.seed, cfg.per, timings, list(spec.budgets[1:]), data, backend)  # fmt: skip


def _write_pareto(pareto: list[dict], problem: Problem, session: Session, spec: RunSpec, out: Path,
                  db: LevelDatabase | None) -> None:  # fmt: skip
    """Every Pareto plan of a multi-objective study as a Plan, evaluated, plus the front as CSV and plot."""
    rows = []
    for i, point in enumerate(sorted(pareto, key=lambda p: p["bytes"])):
        assignment = problem.assignment(point["choice"])
        # levels copied from the study's own level database: a front of many plans stays cheap to evaluate
        m = session.evaluate(assignment, spec.backend.name, db)
        plan_of(spec, session, assignment, "optuna-pareto", m["timings"]).save(out / "pareto" / f"plan_{i:02d}.json")
        rows.append({"plan": f"pareto/plan_{i:02d}.json", "trial": point["trial"], "fitness": point["fitness"],
                     "bytes": m["achieved"]["bytes"], "bits": m["achieved"]["bits"], "perplexity": m["perplexity"],
                     "kl_to_dense": m["kl_to_dense"]})  # fmt: skip
        if spec.latency is not None:
            rows[-1]["latency_ms"] = spec.latency.table.predict(assignment, session.inventory,
                                                                spec.latency.tokens)["predicted_ms"]  # fmt: skip
    write_pareto(rows, out, x="latency_ms" if pareto[0]["objective"].endswith("latency") else "bytes")
