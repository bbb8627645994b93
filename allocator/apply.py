"""Apply a plan: compress the model exactly as the run that made the plan did, and write the compressed model.

A schema-2 plan records its backend, settings and data, so the plan file alone suffices; a schema-1 plan reads
them from the run folder's ``config.json``. The weights come from the level database when the workspace holds
one for the plan's grid (a decode: no calibration pass), else from the backend, calibrated as the database is:
the same weights either way. The checkpoint is the engine's own format (:mod:`allocator.checkpoints.writers`).
"""

from __future__ import annotations

import json
import math
import types
import typing
from dataclasses import fields
from pathlib import Path

import torch
from torch import nn

from allocator import backends, data
from allocator.checkpoints import writers
from allocator.errors import AllocatorError
from allocator.formats import storage_bits
from allocator.inventory import Inventory
from allocator.io import atomic_path, check_output, check_space, write_json_atomic
from allocator.plan import Plan
from allocator.search import option_fields
from allocator.session import Session
from allocator.spec import RunConfig, resolve

_FROM_PLAN = ("calib", "eval", "calib_samples", "kl_samples", "eval_samples", "seq_len", "seed")  # plan.data keys
_BACKEND_SETTINGS = ("batch_size", "dtype", "device", "sequential")  # plan.backend keys besides its name
_JSON_KINDS = {str: "a string", int: "a whole number", float: "a number", bool: "true or false", dict: "an object",
               type(None): "null"}  # fmt: skip


def plan_config(plan_path: Path, plan: Plan, overrides: dict) -> RunConfig:
    """The settings that made ``plan`` (recorded in it, or in the ``config.json`` beside a schema-1 plan),
    updated by ``overrides`` (flags given to ``apply``/``export``)."""
    names = {f.name for f in fields(RunConfig)}
    if plan.schema >= 2:
        settings = {"model": plan.model_id, **{k: plan.data[k] for k in _FROM_PLAN if k in plan.data},
                    **{k: v for k, v in plan.backend.items() if k in _BACKEND_SETTINGS}}  # fmt: skip
        if "name" in plan.backend:
            settings["backend"] = plan.backend["name"]
    else:
        settings = _config_beside(plan_path)
    settings = {k: v for k, v in settings.items() if k in names}
    settings.update({k: v for k, v in overrides.items() if k in names and v is not None})
    settings.update(output_dir=None, plan=None, resume=False, format="any")
    return RunConfig(**settings)


def _config_beside(plan_path: Path) -> dict:
    """The run's settings saved beside a schema-1 plan (a file anyone may have edited): each field of the type
    :class:`RunConfig` or its searcher option declares, else one line naming the field."""
    saved = plan_path.parent / "config.json"
    try:
        base = json.loads(saved.read_text()) if saved.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AllocatorError(f"{saved} is corrupt ({exc}): restore it or delete it and pass the run's flags") from None
    if not isinstance(base, dict):
        raise AllocatorError(f"{saved} is not a run's settings (a JSON object): restore it or delete it")
    hints, known = typing.get_type_hints(RunConfig), option_fields()
    typed = [(name, value, _kinds(hints[name])) for name, value in base.items() if name in hints]
    options = base.get("options")
    for name, value in options.items() if isinstance(options, dict) else ():
        if name in known:  # a searcher option: its declared kind, or null where its default is None
            spec = known[name][0]
            nullable = (type(None),) if spec.default is None else ()
            typed.append((f"options.{name}", value, (spec.metadata["kind"], *nullable)))
    for name, value, kinds in typed:
        if not any(_is(value, kind) for kind in kinds):
            want = " or ".join(_JSON_KINDS[k] for k in kinds)
            raise AllocatorError(f"{saved}: field {name!r} must be {want}, got {json.dumps(value)[:60]}: restore it "
                                 "or delete it and pass the run's flags")  # fmt: skip
    return base


def _kinds(hint: object) -> tuple[type, ...]:
    """The JSON kinds an annotation allows: ``str | None`` -> (str, NoneType), ``dict[str, Any]`` -> (dict,)."""
    arms = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return tuple(typing.get_origin(k) or k for k in arms)


def _is(value: object, kind: type) -> bool:
    """``value`` is of JSON ``kind``: a bool is no number, a whole number is a float too."""
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, kind)


def apply_plan(plan_path: str | Path, output_dir: str | Path, overrides: dict | None = None,
               checkpoint: str | None = None) -> dict:  # fmt: skip
    """Compress, evaluate and write the ``checkpoint`` format (default: the plan's engine's); returns the metrics
    (also written beside the checkpoint, with the size report)."""
    plan_path, out = Path(plan_path), Path(output_dir)
    plan = Plan.load(plan_path)
    overrides = overrides or {}
    over_budget = plan.check_budget(f"plan {plan_path}", bool(overrides.get("allow_over_budget")))
    check_output(out, "--output-dir")
    if out.exists() and any(out.iterdir()):
        raise AllocatorError(f"output folder {str(out)!r} is not empty: pass a new --output-dir")
    checkpoint = checkpoint or writers.default_writer(plan)
    if checkpoint not in writers.WRITERS:
        raise AllocatorError(f"unknown checkpoint format {checkpoint!r}: choose one of {', '.join(writers.WRITERS)}")
    spec = resolve(plan_config(plan_path, plan, overrides))
    session = Session(spec.config)
    plan.check_against(session.inventory)
    grids = session.compress_(plan.assignment, spec.backend.name, session.find_database(plan.grid, spec.backend.name))
    metrics = {**session.measure(plan.assignment, spec.backend.name), "plan": str(plan_path), "checkpoint": checkpoint}
    if over_budget:
        metrics["over_budget"] = over_budget
    dense_rest = sum(p.numel() * p.element_size() for p in session.model.parameters()) - sum(
        session.model.get_submodule(n).weight.nbytes for n in plan.assignment)  # fmt: skip
    planned = sum(storage_bits(lv, *plan.shapes[n]) for n, lv in plan.assignment.items()) // 8
    check_space(
        out, dense_rest + 2 * planned, f"the {checkpoint} checkpoint", "pass another --output-dir or free space"
    )
    with atomic_path(out, folder=True) as tmp:  # out is new or empty (checked above)
        metrics["size"] = writers.write(checkpoint, tmp, session, plan, grids)
        plan.save(tmp / "allocator_plan.json")
        write_json_atomic(tmp / "allocator_metrics.json", metrics)
    return metrics


def apply_(model: nn.Module, plan: Plan, tokenizer=None, calib: torch.Tensor | None = None) -> None:
    """Compress ``model`` in place to ``plan`` with the plan's backend (what ``allocator apply`` writes).

    A calibrating backend (Wanda, SparseGPT, GPTQ) needs the plan's calibration windows: pass ``calib``, or the
    ``tokenizer`` to cut them from the text the plan records.
    """
    plan.check_against(Inventory.from_model(model))
    backend = backends.get_backend(plan.backend.get("name", "magnitude"))
    if backend.needs_data and calib is None:
        if tokenizer is None:
            raise AllocatorError(f"backend {backend.name} calibrates: pass calib windows or the tokenizer")
        d = plan.data
        records = data.load_records(d.get("calib", "c4-validation-2k"))
        calib, _ = data.calibration_split(tokenizer, records, d["seq_len"], d["calib_samples"], d.get("kl_samples", 8),
                                          d["seed"], data.bos_token_id(tokenizer))  # fmt: skip
    backends.apply_(model, plan.assignment, backend.name, calib, plan.backend.get("batch_size", 4))
