"""RunConfig: every setting of one run, saved as ``config.json`` beside the plan, and its checks.

The searchers' options are not fields here: they live on the searchers (``allocator.search``) and a run
carries them in ``options``, checked against those declarations.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from allocator import data
from allocator.errors import AllocatorError
from allocator.formats import get_format
from allocator.io import check_output


@dataclass
class RunConfig:
    """Every knob of one run; saved as ``config.json`` beside the plan."""

    target: str = "sparsity=0.5"
    method: str = "uniform"
    backend: str = "magnitude"
    model: str | None = None  # None: the embedded SmolLM2-135M
    calib: str | None = None  # None: the C4 validation sample
    eval: str | None = None  # None: the WikiText-2 raw test split
    levels: str | None = None  # None: the --format's default grid (sparsity 0..0.9 for any)
    format: str = "any"  # the deployment target plans are made for (allocator.targets): its levels, its bytes
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
    resume: bool = False  # continue an evolution (or optuna study) killed in the same output folder
    latency_table: str | None = None  # a measured table: prices latency/speedup budgets, predicts the plan's time
    latency_tokens: int = 1  # token count latency budgets and predictions hold at
    options: dict[str, Any] = field(default_factory=dict)  # searcher options by name (allocator.search)


def check_config(config: RunConfig) -> None:
    """Counts, device, searcher options and output folder, checked before any model work (one line naming the fix)."""
    from allocator.search import make_searcher

    positive = {"--seq-len": config.seq_len, "--calib-samples": config.calib_samples, "--kl-samples": config.kl_samples,
                "--batch-size": config.batch_size}  # fmt: skip
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
    if not config.plan:  # the searcher checks its options (a compare checks each of its methods the same way)
        make_searcher(config.method, config.options)
    get_format(config.format).check_backend(config.backend)
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
