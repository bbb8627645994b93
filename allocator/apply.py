"""Apply a plan and save a Hugging Face checkpoint that reloads with plain ``transformers``.

The model is compressed exactly as the run that made the plan compressed it (same backend,
calibration data and seed, read from the run folder's ``config.json``), evaluated the same way,
and saved with ``save_pretrained`` (safetensors) plus its tokenizer. Pruned weights are stored as
zeros and quantized weights as their de-quantized values: what every toolkit's "dense with
zeros" checkpoint holds; packed low-bit formats come from the exporters.
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from allocator.config import RunConfig
from allocator.errors import AllocatorError
from allocator.io import atomic_path, check_output, write_json_atomic
from allocator.moe import fuse_experts
from allocator.plan import Plan
from allocator.session import Session


def run_config(plan_path: Path, overrides: dict) -> RunConfig:
    """The settings of the run that made the plan (its ``config.json``), updated by ``overrides``."""
    names = {f.name for f in fields(RunConfig)}
    saved = plan_path.parent / "config.json"
    try:
        base = json.loads(saved.read_text()) if saved.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AllocatorError(f"{saved} is corrupt ({exc}): restore it or delete it and pass the run's flags") from None
    if not isinstance(base, dict):
        raise AllocatorError(f"{saved} is not a run's settings (a JSON object): restore it or delete it")
    settings = {k: v for k, v in base.items() if k in names}
    settings.update({k: v for k, v in overrides.items() if k in names and v is not None})
    settings.update(output_dir=None, plan=None, resume=False)
    return RunConfig(**settings)


def apply_plan(plan_path: str | Path, output_dir: str | Path, overrides: dict | None = None) -> dict:
    """Compress, evaluate and save; returns the metrics (also written beside the checkpoint)."""
    plan_path, out = Path(plan_path), Path(output_dir)
    plan = Plan.load(plan_path)
    over_budget = plan.check_budget(f"plan {plan_path}", bool((overrides or {}).get("allow_over_budget")))
    check_output(out, "--output-dir")
    if out.exists() and any(out.iterdir()):
        raise AllocatorError(f"output folder {str(out)!r} is not empty: pass a new --output-dir")
    config = run_config(plan_path, overrides or {})
    session = Session(config)
    plan.check_against(session.inventory)
    metrics = session.evaluate(plan.assignment, config.backend)
    metrics["plan"] = str(plan_path)
    if over_budget:
        metrics["over_budget"] = over_budget
    with atomic_path(out, folder=True) as tmp:  # out is new or empty (checked above)
        fuse_experts(session.model)  # a mixture-of-experts checkpoint in the layout transformers loads
        session.model.save_pretrained(tmp, safe_serialization=True)
        session.loaded.tokenizer.save_pretrained(tmp)
        plan.save(tmp / "allocator_plan.json")
        write_json_atomic(tmp / "allocator_metrics.json", metrics)
    return metrics
