"""A loaded model with its data, dense reference and cached artifacts (profiles, level databases).

One session serves many plans: the pipeline's single run, and the benchmarks that compare methods on
the same model, data and artifacts in one process.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from allocator import data
from allocator.backends import apply_, get_backend
from allocator.backends.database import DatabaseWriter, LevelDatabase
from allocator.budget import summarize
from allocator.errors import AllocatorError
from allocator.evaluate import kl_divergence, perplexity
from allocator.io import check_output
from allocator.levels import DEFAULT_GRID, Level, with_dense
from allocator.model import DTYPES, Inventory, cache_dir, load_model
from allocator.profile import Profile, artifact_name
from allocator.reference import dense_reference

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
    allow_over_budget: bool = False  # accept a saved plan that breaks its budget (recorded in the metrics)
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


def check_config(config: RunConfig) -> None:
    """Counts, device and output folder, checked before any model work (one line naming the fix)."""
    positive = {"--seq-len": config.seq_len, "--calib-samples": config.calib_samples, "--kl-samples": config.kl_samples,
                "--batch-size": config.batch_size, "--generations": config.generations,
                "--offspring": config.offspring, "--trials": config.trials}  # fmt: skip
    if config.eval_samples is not None:
        positive["--eval-samples"] = config.eval_samples
    for flag, value in positive.items():
        if value < 1:
            raise AllocatorError(f"{flag} must be at least 1, got {value}")
    data.check_seq_len(config.seq_len)
    if config.fit_rounds < 0 or min(config.fit_seqs, config.fit_plans) < 1:
        raise AllocatorError("--fit-seqs and --fit-plans must be >= 1 and --fit-rounds >= 0")
    if config.latency_tokens < 1:
        raise AllocatorError(f"--latency-tokens must be at least 1, got {config.latency_tokens}")
    if not 0 <= config.lam < 1:
        raise AllocatorError(f"--lam must be in [0, 1) (OWL's sparsity spread), got {config.lam}")
    if config.time_limit is not None and not config.time_limit > 0:
        raise AllocatorError(f"--time-limit must be > 0 seconds, got {config.time_limit}")
    check_device(config.device)
    if config.output_dir:
        check_output(config.output_dir, "--output-dir")


def check_device(device: str) -> None:
    """A device torch knows and this machine has."""
    try:
        torch.device(device)
    except RuntimeError:
        raise AllocatorError(f"unknown --device {device!r}: use cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AllocatorError(f"--device {device}: this machine has no CUDA GPU; use --device cpu")


class Session:
    """A loaded model with its data and dense reference, ready to compress and evaluate many plans.

    The dense perplexity and the KL teacher are computed once, when first needed; :meth:`evaluate` restores the
    original weights before each plan, so plans and backends can be compared in one run.
    """

    def __init__(self, config: RunConfig) -> None:
        check_config(config)
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
        self.bos = data.bos_token_id(tokenizer)  # windows start with BOS where the tokenizer adds one
        self.eval_seqs = data.evaluation_sequences(
            tokenizer, eval_records, config.seq_len, config.eval_samples, self.bos
        )
        # One seeded draw, split: the first windows calibrate the backend, the last measure KL.
        windows = data.calibration_sequences(
            tokenizer, calib_records, config.seq_len, config.calib_samples + config.kl_samples, config.seed, self.bos
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
        meta = {"calib": cfg.calib or "c4-validation-2k", "calib_samples": cfg.calib_samples,
                "seq_len": cfg.seq_len, "seed": cfg.seed}  # fmt: skip
        return {**meta, "bos": True} if self.bos is not None else meta  # no key without BOS: older names hold

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
                writer = DatabaseWriter(self.inventory, with_dense(levels), backend, db_path, self.calib)
                also.append(stack.enter_context(writer))
            profile = Profile.measure(self.model, self.inventory, levels, backend, self.calib, calib_meta,
                                      cfg.batch_size, also)  # fmt: skip
        profile.meta["measure_s"] = time.perf_counter() - t0
        profile.save(target)
        log.info("saved profile %s (%.1f s)", target, profile.meta["measure_s"])
        return profile

    def _database_path(self, levels: list[Level], backend: str) -> Path:
        """One database per grid (``dense`` is always stored, so a grid with or without it is the same)."""
        return cache_dir() / "db" / artifact_name(self.loaded.model_id, backend, with_dense(levels), self.calib_meta)

    def _open_database(self, path: Path, levels: list[Level]) -> LevelDatabase | None:
        """The cached database at ``path`` if it holds every level, else None."""
        if (path / "manifest.json").is_file():
            try:
                db = LevelDatabase.open(path, self.inventory)
            except AllocatorError as exc:  # an older format or a corrupt manifest: build it again
                log.info("not reusing %s: %s", path, exc)
                return None
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
            database.load_into_(self.model, assignment)
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
            "bos_per_window": self.bos is not None,  # windows start with the tokenizer's BOS (not scored)
            "perplexity": ppl,
            "kl_to_dense": kl,
            "achieved": summarize(assignment, self.inventory),
            "eval_tokens": int(self.eval_seqs.numel()),
            "kl_tokens": int(self.kl_seqs.numel()),
            "calibration_tokens": int(calib.numel()) if calib is not None else 0,
            "timings": {**self.timings, "compress_s": compress_s, "eval_s": time.perf_counter() - t0},
        }
