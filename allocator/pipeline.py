"""The main job end to end: load, allocate under a budget, compress, evaluate, write the run folder."""

from __future__ import annotations

import logging
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from allocator import artifacts
from allocator.backends import get_backend
from allocator.backends.database import LevelDatabase
from allocator.budget import build_problem, parse_budgets
from allocator.config import RunConfig, check_config
from allocator.errors import AllocatorError
from allocator.fitness import KLFitness
from allocator.formats import format_grid
from allocator.io import write_json_atomic
from allocator.latency.table import LatencyModel, LatencyTable
from allocator.plan import Plan
from allocator.report import write_history, write_pareto
from allocator.search import SearchContext, allocate, make_searcher
from allocator.sensitivity import SENSITIVITIES
from allocator.sensitivity.select import sensitivity_matrix
from allocator.session import Session

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run produced: the plan and its metrics (also written to the output folder)."""

    plan: Plan
    metrics: dict = field(default_factory=dict)
    output_dir: Path | None = None


def run(config: RunConfig, session: Session | None = None) -> RunResult:
    """Allocate, compress and evaluate as ``config`` says; write plan.json, metrics.json, config.json.

    Inputs are validated before any heavy work, and nothing is written unless the run succeeds. A
    ``session`` loaded with the same model and data is reused (``allocator compare`` runs many plans on one);
    the model is left compressed to the plan.
    """
    budget, *extra = parse_budgets(config.target)
    grid = format_grid(config.levels, config.format)
    if config.sensitivity not in SENSITIVITIES:
        raise AllocatorError(f"unknown --sensitivity {config.sensitivity!r}: choose one of {', '.join(SENSITIVITIES)}")
    if config.fit_prior not in ("auto", "kl", "fisher"):
        raise AllocatorError(f"unknown --fit-prior {config.fit_prior!r}: choose auto, kl or fisher")
    check_config(config)  # before any model work
    searcher = None if config.plan else make_searcher(config.method, config.options)
    if searcher is not None:
        if "latency" in searcher.needs() and not config.latency_table:
            raise AllocatorError(f"{searcher.name} with these options needs a measured table: pass --latency-table")
        searcher.check()  # what touches the outside world (a study's storage), before the profile is measured
    out = Path(config.output_dir) if config.output_dir else None
    saved = Plan.load(config.plan) if config.plan else None
    get_backend(config.backend)
    latency = (
        LatencyModel(LatencyTable.load(config.latency_table), config.latency_tokens) if config.latency_table else None
    )
    session = session or Session(config)
    inventory = session.inventory
    allocation, sensitivity, db = None, None, None
    over_budget: list[str] = []
    if saved is not None:
        saved.check_against(inventory)
        over_budget = saved.check_budget(f"plan {config.plan}", config.allow_over_budget, latency)
        assignment, budget, grid, method = saved.assignment, saved.budget, saved.grid, f"plan:{saved.method}"
        extra = saved.extra_budgets
    else:
        problem = build_problem(inventory, grid, budget, config.per, extra, latency)
        needs = searcher.needs()
        if needs & {"profile", "outliers"}:
            with_db = "fitness" in needs or config.sensitivity in ("kl", "fitted")
            profile = artifacts.profile(session, grid, config.backend, config.profile, with_database=with_db)
            error, sensitivity = sensitivity_matrix(session, profile, problem, config.backend, config.sensitivity)
            problem = problem.with_profile(error, profile.outlier_ratio(problem.units))
        fitness = None
        if "fitness" in needs:
            db = artifacts.database(session, grid, config.backend)
            fitness = KLFitness(session.model, inventory, problem, db, session.calib, config.batch_size)
        allocation = allocate(problem, searcher, SearchContext(config.seed, fitness, out, config.resume))
        assignment, method = allocation.assignment, config.method
    metrics = session.evaluate(assignment, config.backend)
    metrics = {"budget": str(budget), "method": method, **metrics}
    if over_budget:  # accepted only with --allow-over-budget: say so where the figures are
        metrics["over_budget"] = over_budget
    if sensitivity is not None:
        metrics["sensitivity"] = {"kind": config.sensitivity, **{k: v for k, v in sensitivity.items()
                                                                 if k not in ("choices", "kl", "weights")}}  # fmt: skip
    if allocation is not None and allocation.stats:
        metrics["search"] = allocation.stats
    if latency is not None:
        metrics["latency"] = {
            **latency.table.predict(assignment, inventory, latency.tokens),
            "table": config.latency_table,
        }
    metrics["timings"]["search_s"] = allocation.search_s if allocation is not None else 0.0
    plan = Plan.create(
        assignment, inventory, session.loaded.model_id, budget, grid, method, config.seed, config.per,
        metrics["timings"], extra, {**session.calib_meta, "bos_per_window": session.bos is not None},
    )  # fmt: skip
    if out is not None:
        if allocation is not None and allocation.history:
            write_history(allocation.history, out)
        if allocation is not None and allocation.front:
            _write_pareto(allocation.front, problem, session, config, budget, grid, extra, out, latency, db)
        write_json_atomic(out / "config.json", {**asdict(config), "versions": _versions()})
        if sensitivity:
            write_json_atomic(out / "sensitivity.json", sensitivity)
        plan.save(out / "plan.json")
        write_json_atomic(out / "metrics.json", metrics)
    return RunResult(plan, metrics, out)


def _write_pareto(pareto, problem, session: Session, config: RunConfig, budget, grid, extra, out: Path,
                  latency: LatencyModel | None, db: LevelDatabase | None) -> None:  # fmt: skip
    """Every Pareto plan of a multi-objective study as a Plan, evaluated, plus the front as CSV and plot."""
    rows = []
    for i, point in enumerate(sorted(pareto, key=lambda p: p["bytes"])):
        assignment = problem.assignment(point["choice"])
        # levels copied from the study's own level database: a front of many plans stays cheap to evaluate
        m = session.evaluate(assignment, config.backend, db)
        plan = Plan.create(assignment, session.inventory, session.loaded.model_id, budget, grid, "optuna-pareto",
                           config.seed, config.per, m["timings"], extra)  # fmt: skip
        plan.save(out / "pareto" / f"plan_{i:02d}.json")
        rows.append({"plan": f"pareto/plan_{i:02d}.json", "trial": point["trial"], "fitness": point["fitness"],
                     "bytes": m["achieved"]["bytes"], "bits": m["achieved"]["bits"], "perplexity": m["perplexity"],
                     "kl_to_dense": m["kl_to_dense"]})  # fmt: skip
        if latency is not None:
            rows[-1]["latency_ms"] = latency.table.predict(assignment, session.inventory, latency.tokens)[
                "predicted_ms"
            ]
    write_pareto(rows, out, x="latency_ms" if pareto[0]["objective"].endswith("latency") else "bytes")


def _versions() -> dict[str, str]:
    import transformers

    import allocator

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        sha = ""
    return {
        "allocator": allocator.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "git_sha": sha,
    }
