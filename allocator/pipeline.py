"""The main job end to end: load, allocate under a budget, compress, evaluate, write the run folder."""

from __future__ import annotations

import contextlib
import logging
import platform
import subprocess
import time
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from allocator import data
from allocator.backends import apply_, get_backend
from allocator.backends.database import DatabaseWriter, LevelDatabase
from allocator.budget import build_problem, parse_budgets, summarize
from allocator.errors import AllocatorError
from allocator.evaluate import kl_divergence, perplexity
from allocator.fitness import KLFitness
from allocator.io import write_json_atomic
from allocator.latency.table import LatencyModel, LatencyTable
from allocator.levels import DEFAULT_GRID, Level, parse_grid, parse_level
from allocator.model import DTYPES, Inventory, cache_dir, load_model
from allocator.plan import Plan
from allocator.profile import Profile, artifact_name
from allocator.reference import dense_reference
from allocator.report import write_history, write_pareto
from allocator.search import NEEDS_PROFILE, get_searcher
from allocator.sensitivity import SENSITIVITIES
from allocator.sensitivity.select import sensitivity_matrix

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """Every knob of one run; saved as ``config.json`` beside the plan."""

    target: str = "sparsity=0.5"
    method: str = "uniform"
    backend: str = "magnitude"
    model: str | None = None  # None: the embedded SmolLM2-135M
    calib: str | None = None  # None: the C4 validation sample
    eval: str | None = None  # None: the WikiText-2 raw test split
    levels: str = DEFAULT_GRID
    per: str = "layer"
    seq_len: int = 512
    calib_samples: int = 128
    kl_samples: int = 8
    eval_samples: int | None = 32  # None: the whole evaluation text
    dense_cache: bool = True  # reuse the dense perplexity and KL teacher of an earlier run (same weights, data)
    batch_size: int = 4
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    output_dir: str | None = None
    plan: str | None = None  # a saved plan.json to apply instead of searching
    profile: str | None = None  # a profile .parquet to use (None: reuse or measure one under profiles_dir)
    profiles_dir: str = "profiles"
    sensitivity: str = "fitted"  # what knapsack / optuna-compact / a knapsack start minimise (allocator.sensitivity)
    fit_prior: str = "auto"  # fitted: the prior it re-weights (kl | fisher | auto: kl on a GPU or if measured)
    fit_seqs: int = 8  # kl and fitted sensitivities: calibration windows whose KL they measure
    fit_plans: int = 64  # fitted: random feasible plans measured before the first fit
    fit_rounds: int = 4  # fitted: knapsack -> measure -> refit rounds after it
    lam: float = 0.08  # OWL's λ
    time_limit: float | None = None  # knapsack MILP time limit (s)
    generations: int = 50  # evolution: generations, offspring per generation, selection stages, start point
    offspring: int = 16
    stages: str = "4@1024,1@4096"
    start: str = "uniform"
    resume: bool = False  # continue an evolution (or optuna study) killed in the same output folder
    space: str = "levels"  # optuna: search space (levels | compact), sampler, trials, objectives, storage
    sampler: str = "tpe"
    trials: int = 100
    objectives: str = "fitness"
    storage: str | None = None  # None: a journal file in the output folder
    study_name: str = "allocator"
    latency_table: str | None = None  # a measured table: prices latency/speedup budgets, predicts the plan's time
    latency_tokens: int = 1  # token count latency budgets and predictions hold at


@dataclass
class RunResult:
    """What a run produced: the plan and its metrics (also written to the output folder)."""

    plan: Plan
    metrics: dict = field(default_factory=dict)
    output_dir: Path | None = None


class Session:
    """A loaded model with its data and dense reference, ready to compress and evaluate many plans.

    The dense perplexity and the KL teacher are computed once, when first needed; :meth:`evaluate` restores the
    original weights before each plan, so plans and backends can be compared in one run.
    """

    def __init__(self, config: RunConfig) -> None:
        if config.dtype not in DTYPES:
            raise AllocatorError(f"unknown --dtype {config.dtype!r}: choose one of {', '.join(DTYPES)}")
        calib_records = data.load_records(config.calib or data.default_calibration())
        eval_records = data.load_records(config.eval or data.default_evaluation())
        self.config = config
        self.timings: dict[str, float] = {}
        t0 = time.perf_counter()
        self.loaded = load_model(config.model, dtype=DTYPES[config.dtype], device=config.device)
        self.model = self.loaded.model
        self.inventory = Inventory.from_model(self.model)
        self.timings["load_s"] = time.perf_counter() - t0
        tokenizer = self.loaded.tokenizer
        self.eval_seqs = data.evaluation_sequences(tokenizer, eval_records, config.seq_len, config.eval_samples)
        # One seeded draw, split: the first windows calibrate the backend, the last measure KL.
        windows = data.calibration_sequences(
            tokenizer, calib_records, config.seq_len, config.calib_samples + config.kl_samples, config.seed
        )
        self.calib, self.kl_seqs = windows[: config.calib_samples], windows[config.calib_samples :]
        self._original = {
            n: {k: v.detach().clone() for k, v in self.model.get_submodule(n).named_parameters()}
            for n in self.inventory.shapes
        }

    @cached_property
    def dense(self) -> tuple[float, torch.Tensor]:
        """Dense perplexity and the KL teacher's log-probs: from the cache, or measured once, on first use."""
        self.restore_()
        t0 = time.perf_counter()
        cfg = self.config
        ppl, teacher, cached = dense_reference(self.model, self.eval_seqs, self.kl_seqs, cfg.batch_size,
                                               cache_dir() / "dense" if cfg.dense_cache else None)  # fmt: skip
        self.timings["dense_eval_s"] = time.perf_counter() - t0
        self.dense_cached = cached
        log.info("dense perplexity %.3f%s", ppl, " (cached)" if cached else "")
        return ppl, teacher

    @property
    def calib_meta(self) -> dict:
        """What the calibration windows are: profiles and databases are keyed by it."""
        cfg = self.config
        return {"calib": cfg.calib or "c4-validation-2k", "calib_samples": cfg.calib_samples,
                "seq_len": cfg.seq_len, "seed": cfg.seed}  # fmt: skip

    def profile_file(self, levels: list[Level], backend: str) -> Path:
        """Where the profile for ``levels`` and ``backend`` on this session's data is saved."""
        name = artifact_name(self.loaded.model_id, backend, levels, self.calib_meta) + ".parquet"
        return Path(self.config.profiles_dir) / name

    def profile(
        self, levels: list[Level], backend: str, path: str | None = None, with_database: bool = False
    ) -> Profile:
        """The sensitivity profile of this model for ``levels``: loaded if saved, else measured and saved.

        ``with_database``: the caller will need the level database too; the profile's pass builds it.
        """
        cfg, calib_meta = self.config, self.calib_meta
        target = Path(path) if path else self.profile_file(levels, backend)
        if target.is_file() or path:
            try:
                profile = Profile.load(target)
            except AllocatorError:
                if path:
                    raise
                profile = None  # a cached profile of an older version (or cut short): measure it again
            if profile is not None:
                profile.check(self.inventory, levels, backend)
                log.info("reusing profile %s", target)
                return profile
        self.restore_()
        t0 = time.perf_counter()
        db_path = self._database_path(levels, backend)
        with contextlib.ExitStack() as stack:
            also = []
            if with_database and self._open_database(db_path, levels) is None:
                writer = DatabaseWriter(self.inventory, _with_dense(levels), backend, db_path, self.calib)
                also.append(stack.enter_context(writer))
            profile = Profile.measure(self.model, self.inventory, levels, backend, self.calib, calib_meta,
                                      cfg.batch_size, also)  # fmt: skip
        profile.meta["measure_s"] = time.perf_counter() - t0
        profile.save(target)
        log.info("saved profile %s (%.1f s)", target, profile.meta["measure_s"])
        return profile

    def _database_path(self, levels: list[Level], backend: str) -> Path:
        """One database per grid (``dense`` is always stored, so a grid with or without it is the same)."""
        return cache_dir() / "db" / artifact_name(self.loaded.model_id, backend, _with_dense(levels), self.calib_meta)

    def _open_database(self, path: Path, levels: list[Level]) -> LevelDatabase | None:
        """The cached database at ``path`` if it holds every level, else None."""
        if (path / "manifest.json").is_file():
            db = LevelDatabase.open(path, self.inventory)
            if {lv.name for lv in levels} <= set(db.manifest["levels"]):
                return db
        return None

    def database(self, levels: list[Level], backend: str) -> LevelDatabase:
        """The level database for ``levels`` (built once, cached under the allocator cache folder)."""
        path = self._database_path(levels, backend)
        if (db := self._open_database(path, levels)) is not None:
            return db
        self.restore_()
        db = LevelDatabase.build(self.model, self.inventory, levels, backend, path, self.calib, self.config.batch_size)
        log.info("built level database %s (%.2f GB)", path, db.manifest["bytes"] / 1e9)
        return db

    @torch.no_grad()
    def restore_(self) -> None:
        """Put the dense weights and biases of every compressible layer back."""
        for name, params in self._original.items():
            module = self.model.get_submodule(name)
            for key, value in params.items():
                getattr(module, key).copy_(value)

    def evaluate(self, assignment: dict[str, Level], backend: str, database: LevelDatabase | None = None) -> dict:
        """Compress the dense model to ``assignment`` with ``backend`` and measure it.

        With a ``database`` the levels are copied from it (calibrated on dense inputs, as EvoPress
        does) instead of re-running the backend block by block on the partly compressed model.
        """
        dense_ppl, teacher = self.dense
        self.restore_()
        chosen = get_backend(backend)
        t0 = time.perf_counter()
        calib = self.calib if chosen.needs_data else None
        if database is not None:
            database.load_into_(self.model, self.inventory, assignment)
        else:
            apply_(self.model, assignment, backend, calib, self.config.batch_size)
        compress_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ppl = perplexity(self.model, self.eval_seqs, self.config.batch_size, desc="compressed perplexity")
        kl = kl_divergence(self.model, self.kl_seqs, teacher, self.config.batch_size)
        return {
            "model": self.loaded.model_id,
            "backend": backend,
            "dense_perplexity": dense_ppl,
            "dense_cached": self.dense_cached,
            "perplexity": ppl,
            "kl_to_dense": kl,
            "achieved": summarize(assignment, self.inventory),
            "eval_tokens": int(self.eval_seqs.numel()),
            "kl_tokens": int(self.kl_seqs.numel()),
            "calibration_tokens": int(calib.numel()) if calib is not None else 0,
            "timings": {**self.timings, "compress_s": compress_s, "eval_s": time.perf_counter() - t0},
        }


def _with_dense(levels: list[Level]) -> list[Level]:
    return list(dict.fromkeys([parse_level("dense"), *levels]))


def run(config: RunConfig) -> RunResult:
    """Allocate, compress and evaluate as ``config`` says; write plan.json, metrics.json, config.json.

    Inputs are validated before any heavy work, and nothing is written unless the run succeeds.
    """
    budget, *extra = parse_budgets(config.target)
    grid = parse_grid(config.levels)
    if config.sensitivity not in SENSITIVITIES:
        raise AllocatorError(f"unknown --sensitivity {config.sensitivity!r}: choose one of {', '.join(SENSITIVITIES)}")
    if config.fit_prior not in ("auto", "kl", "fisher"):
        raise AllocatorError(f"unknown --fit-prior {config.fit_prior!r}: choose auto, kl or fisher")
    if min(config.fit_seqs, config.fit_plans) < 1 or config.fit_rounds < 0:
        raise AllocatorError("--fit-seqs and --fit-plans must be >= 1 and --fit-rounds >= 0")
    out = Path(config.output_dir) if config.output_dir else None
    options = {
        "owl": {"lam": config.lam},
        "knapsack": {"time_limit": config.time_limit},
        "evolution": {"generations": config.generations, "offspring": config.offspring, "stages": config.stages,
                      "start": config.start, "resume": config.resume,
                      "checkpoint": str(out / "evolution_state.json") if out else None},
        "optuna": {"space": config.space, "sampler": config.sampler, "trials": config.trials,
                   "objectives": config.objectives, "study_name": config.study_name, "resume": config.resume,
                   "storage": config.storage or (str(out / "optuna.journal") if out else None)},
    }.get(config.method, {})  # fmt: skip
    searcher = None if config.plan else get_searcher(config.method, **options)
    saved = Plan.load(config.plan) if config.plan else None
    get_backend(config.backend)
    latency = (
        LatencyModel(LatencyTable.load(config.latency_table), config.latency_tokens) if config.latency_table else None
    )
    session = Session(config)
    inventory = session.inventory
    sensitivity = None
    t0 = time.perf_counter()
    if saved is not None:
        saved.check_against(inventory)
        assignment, budget, grid, method = saved.assignment, saved.budget, saved.grid, f"plan:{saved.method}"
        extra = saved.extra_budgets
    else:
        problem = build_problem(inventory, grid, budget, config.per, extra, latency)
        if config.method in NEEDS_PROFILE or config.start == "knapsack" and config.method == "evolution":
            needs_db = config.method in ("evolution", "optuna") or config.sensitivity in ("kl", "fitted")
            profile = session.profile(grid, config.backend, config.profile, with_database=needs_db)
            problem.error, sensitivity = sensitivity_matrix(session, profile, problem, config.backend,
                                                            config.sensitivity)  # fmt: skip
            problem.info["outlier_ratio"] = profile.outlier_ratio(problem.units)
        if config.method in ("evolution", "optuna"):
            db = session.database(grid, config.backend)
            problem.fitness = KLFitness(session.model, inventory, problem, db, session.calib, config.batch_size)
        t0 = time.perf_counter()
        assignment, method = problem.assignment(searcher.search(problem, config.seed)), config.method
    search_s = time.perf_counter() - t0
    metrics = session.evaluate(assignment, config.backend)
    metrics = {"budget": str(budget), "method": method, **metrics}
    if sensitivity is not None:
        metrics["sensitivity"] = {"kind": config.sensitivity, **{k: v for k, v in sensitivity.items()
                                                                 if k not in ("choices", "kl", "weights")}}  # fmt: skip
    if latency is not None:
        metrics["latency"] = {
            **latency.table.predict(assignment, inventory, latency.tokens),
            "table": config.latency_table,
        }
    metrics["timings"]["search_s"] = search_s
    plan = Plan.create(
        assignment, inventory, session.loaded.model_id, budget, grid, method, config.seed, config.per,
        metrics["timings"], extra,
    )  # fmt: skip
    if out is not None:
        if getattr(searcher, "history", None):
            write_history(searcher.history, out)
        if getattr(searcher, "pareto", None):
            _write_pareto(searcher.pareto, problem, session, config, budget, grid, extra, out, latency)
        write_json_atomic(out / "config.json", {**asdict(config), "versions": _versions()})
        if sensitivity:
            write_json_atomic(out / "sensitivity.json", sensitivity)
        plan.save(out / "plan.json")
        write_json_atomic(out / "metrics.json", metrics)
    return RunResult(plan, metrics, out)


def _write_pareto(pareto, problem, session: Session, config: RunConfig, budget, grid, extra, out: Path,
                  latency: LatencyModel | None = None) -> None:  # fmt: skip
    """Every Pareto plan of a multi-objective study as a Plan, evaluated, plus the front as CSV and plot."""
    rows = []
    for i, point in enumerate(sorted(pareto, key=lambda p: p["bytes"])):
        assignment = problem.assignment(point["choice"])
        # levels copied from the study's own level database: a front of many plans stays cheap to evaluate
        m = session.evaluate(assignment, config.backend, getattr(problem.fitness, "db", None))
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
    write_pareto(rows, out, x="latency_ms" if config.objectives.endswith("latency") else "bytes")


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
