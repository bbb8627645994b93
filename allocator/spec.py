"""A run's settings as given (:class:`RunConfig`, saved as ``config.json``) and as resolved once (:class:`RunSpec`).

:func:`resolve` parses and checks everything a run depends on — budgets, grid, format, backend, searcher with
its options, latency model, counts, device, output folder — before any model work, in one place, and builds
the searcher once. Session, pipeline, compare and apply receive the spec; none of them checks a setting again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from allocator import data
from allocator.backends import Backend, get_backend
from allocator.budget import Budget, parse_budgets
from allocator.errors import AllocatorError
from allocator.formats import Format, format_grid, get_format
from allocator.io import check_output
from allocator.latency.table import LatencyModel, LatencyTable
from allocator.levels import Level
from allocator.model import DTYPES
from allocator.plan import Plan
from allocator.search import Searcher, make_searcher
from allocator.search.fitted import CPU_FIT, GPU_FIT
from allocator.sensitivity import SENSITIVITIES
from allocator.tasks import parse_tasks

log = logging.getLogger(__name__)


@dataclass
class RunConfig:
    """Every knob of one run, as the user gave it; saved as ``config.json`` beside the plan."""

    target: str = "sparsity=0.5"  # the budget(s)
    method: str = "uniform"
    backend: str = "magnitude"
    model: str | None = None  # None: the embedded SmolLM2-135M
    calib: str | None = None  # None: the C4 validation sample
    eval: str | None = None  # None: the WikiText-2 raw test split
    levels: str | None = None  # None: the --format's default grid (sparsity 0..0.9 for any)
    format: str = "any"  # the deployment format plans are made for (allocator.formats): its levels, its bytes
    gpu: str = "any"  # the GPU the format's engine serves on: only levels it has kernels for there (vllm)
    per: str | None = None  # one level per layer or tie group (None: tie groups where the format's engine fuses)
    seq_len: int = 512
    calib_samples: int = 128
    kl_samples: int = 8
    eval_samples: int | None = 32  # None: the whole evaluation text
    dense_cache: bool = True  # reuse the dense perplexity and KL teacher of an earlier run (same weights, data)
    batch_size: int = 4
    sequential: bool = False  # calibrate each block on the compressed blocks' outputs (not on dense activations)
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    output_dir: str | None = None
    plan: str | None = None  # a saved plan.json to apply instead of searching
    allow_over_budget: bool = False  # accept a saved plan that breaks its budget (recorded in the metrics)
    profile: str | None = None  # a profile .parquet to use (None: reuse or measure one in the workspace)
    cache_dir: str | None = None  # the workspace root (None: $ALLOCATOR_CACHE or ~/.cache/allocator)
    sensitivity: str | None = None  # what knapsack / optuna-compact / a knapsack start minimise (None: by device)
    fit_seqs: int | None = None  # kl/fitted sensitivities: calibration windows measured (None: by device)
    resume: bool = False  # continue a killed evolution, fitted search or optuna study in the same output folder
    latency_table: str | None = None  # a measured table: prices latency/speedup budgets, predicts the plan's time
    latency_tokens: int = 1  # token count latency budgets and predictions hold at
    tasks: str | None = None  # lm-eval tasks (names or task .yaml files) scored on the plan's model beside perplexity
    tasks_limit: int | None = None  # items per task (None: every item)
    options: dict[str, Any] = field(default_factory=dict)  # searcher options by name (allocator.search)


@dataclass(frozen=True)
class RunSpec:
    """A run resolved once: what :func:`resolve` parsed and checked, and the searcher it built."""

    config: RunConfig
    budgets: tuple[Budget, ...]
    grid: tuple[Level, ...]
    format: Format
    backend: Backend
    searcher: Searcher | None  # None when a saved plan is applied
    saved: Plan | None  # the plan to apply (--plan)
    latency: LatencyModel | None
    sensitivity: str  # the profile column the problem carries (the searcher's choice: the fitted search's prior)
    fitter: Searcher | None  # the fitted search that makes the ``fitted`` sensitivity, when the run needs one

    @property
    def budget(self) -> Budget:
        """The primary budget."""
        return self.budgets[0]

    @property
    def needs(self) -> frozenset[str]:
        """What the run must measure before it searches: ``profile`` (a sensitivity column), ``outliers``
        (OWL's ratios), ``database`` (the level database), ``fitness`` (KL on the real model), ``fitted``."""
        if self.searcher is None:
            return frozenset()
        wants = set(self.searcher.needs())
        if "profile" in wants and self.sensitivity in ("kl", "fitted"):
            wants |= {"database"} | ({"fitted"} if self.sensitivity == "fitted" else set())
        if "fitness" in wants:
            wants.add("database")
        return frozenset(wants)


def device_defaults(config: RunConfig) -> RunConfig:
    """``config`` with what the device decides filled in where the run left it open, said once a process.

    The sensitivity: ``fitted`` on a GPU (~80 measured plans on 8 windows take a minute there), the Fisher prior
    alone on a CPU, where two cores afford only ~16 plans on 2 windows: that fit kept the prior's plan or bettered
    it by a few percent at 3x the time (results/first_command.md). What the fitted search measures
    (``--fit-plans``, ``--fit-rounds``, ``--fit-seqs``): the device's amount, also when a CPU run asks for it.
    """
    cuda = str(config.device).startswith("cuda")
    chosen = GPU_FIT if cuda else CPU_FIT
    options = {**config.options, **{k: chosen[k] for k in ("fit_plans", "fit_rounds")
                                    if config.options.get(k) is None}}  # fmt: skip
    sensitivity = config.sensitivity or ("fitted" if cuda else "fisher")
    filled = replace(config, options=options, sensitivity=sensitivity,
                     fit_seqs=chosen["fit_seqs"] if config.fit_seqs is None else config.fit_seqs)  # fmt: skip
    if not cuda and not _SAID and config.method not in ("uniform", "owl"):
        if config.sensitivity is None and config.method != "fitted":
            _SAID.append(True)  # once a process: a comparison resolves every cell
            log.info("on a CPU the default sensitivity is the Fisher prior alone (a GPU fits it to ~%d measured "
                     "plans): pass --sensitivity fitted to fit it here too", GPU_FIT["fit_plans"])  # fmt: skip
        elif _uses_fitted(filled) and filled != config:
            _SAID.append(True)
            log.info("on a CPU the fitted sensitivity measures %d plans + %d round on %d windows (on a GPU %d + %d on "
                     "%d): pass --fit-plans, --fit-rounds, --fit-seqs to choose", options["fit_plans"],
                     options["fit_rounds"], filled.fit_seqs, *GPU_FIT.values())  # fmt: skip
    return filled


_SAID: list[bool] = []


def _uses_fitted(config: RunConfig) -> bool:
    return config.method == "fitted" or (config.sensitivity == "fitted" and config.method not in ("uniform", "owl"))


def resolve(config: RunConfig) -> RunSpec:
    """Parse and check every setting of ``config`` (one line naming the fix), before any model work."""
    config = device_defaults(config)
    positive = {"--seq-len": config.seq_len, "--calib-samples": config.calib_samples, "--kl-samples": config.kl_samples,
                "--batch-size": config.batch_size, "--fit-seqs": config.fit_seqs,
                "--latency-tokens": config.latency_tokens}  # fmt: skip
    if config.eval_samples is not None:
        positive["--eval-samples"] = config.eval_samples
    if config.tasks_limit is not None:
        positive["--tasks-limit"] = config.tasks_limit
    for flag, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise AllocatorError(f"{flag} must be a whole number, got {value!r}")
        if value < 1:
            raise AllocatorError(f"{flag} must be at least 1, got {value}")
    data.check_seq_len(config.seq_len)
    parse_tasks(config.tasks)
    if config.dtype not in DTYPES:
        raise AllocatorError(f"unknown --dtype {config.dtype!r}: choose one of {', '.join(DTYPES)}")
    check_device(config.device)
    if config.sensitivity not in SENSITIVITIES:
        raise AllocatorError(f"unknown --sensitivity {config.sensitivity!r}: choose one of {', '.join(SENSITIVITIES)}")
    fmt = get_format(config.format, config.gpu)
    fmt.check_backend(config.backend)
    if fmt.fused and config.per == "layer":
        raise AllocatorError(f"--format {fmt.name} serves q/k/v and gate/up fused, one setting each: --per layer plans "
                             "cannot be loaded; leave --per out (tie groups) or pass --per tie-group")  # fmt: skip
    config = replace(config, per=config.per or ("tie-group" if fmt.fused else "layer"))
    backend = get_backend(config.backend)
    saved = Plan.load(config.plan) if config.plan else None
    budgets = tuple(parse_budgets(config.target)) if saved is None else (saved.budget, *saved.extra_budgets)
    grid = tuple(format_grid(config.levels, config.format, config.gpu)) if saved is None else tuple(saved.grid)
    searcher = None if saved is not None else make_searcher(config.method, config.options)
    latency = None
    if config.latency_table:
        latency = LatencyModel(LatencyTable.load(config.latency_table), config.latency_tokens)
    if searcher is not None:
        if "latency" in searcher.needs() and latency is None:
            raise AllocatorError(f"{searcher.name} with these options needs a measured table: pass --latency-table")
        searcher.check()  # what touches the outside world (a study's storage)
    if config.output_dir:
        check_output(config.output_dir, "--output-dir")
        written = Path(config.output_dir, "plan.json")
        if config.plan and written.exists() and written.samefile(config.plan):
            raise AllocatorError(f"--output-dir {config.output_dir} holds the --plan {config.plan} this run reads: it "
                                 "would be overwritten; pass another --output-dir")  # fmt: skip
    sensitivity = searcher.sensitivity(config.sensitivity) if searcher is not None else config.sensitivity
    needs_profile = searcher is not None and "profile" in searcher.needs()
    fitter = make_searcher("fitted", config.options) if needs_profile else None  # its options checked, used or not
    fitter = fitter if sensitivity == "fitted" else None
    return RunSpec(config, budgets, grid, fmt, backend, searcher, saved, latency, sensitivity, fitter)


def check_device(device: str) -> None:
    """A device torch knows and this machine has."""
    try:
        torch.device(device)
    except RuntimeError:
        raise AllocatorError(f"unknown --device {device!r}: use cpu, cuda or cuda:N") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AllocatorError(f"--device {device}: this machine has no CUDA GPU; use --device cpu")
