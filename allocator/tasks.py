"""Downstream accuracy through lm-evaluation-harness, on the model as it is in memory (compressed to a plan).

What users and papers report for compressed models (EvoPress, OWL, AutoRound, llm-compressor) is lm-eval's task
accuracy beside perplexity. The plan's model is handed to lm-eval's ``HFLM`` wrapper as it is, never saved and
reloaded, so the figure belongs to exactly the weights allocator measured. Tasks are lm-eval's names (``arc_easy``,
``hellaswag``: their datasets come from the hub) or paths to task YAML files of one's own (their folders are given
to lm-eval's ``TaskManager``; a YAML over a local JSONL runs offline). Intervals: a seeded percentile bootstrap over
items, as perplexity's over windows.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import yaml
from torch import nn

from allocator.errors import AllocatorError, first_line
from allocator.evaluate import bootstrap_mean

log = logging.getLogger(__name__)
PRIMARY = ("acc_norm", "acc", "exact_match")  # the figure a table shows first, as papers report them


def parse_tasks(spec: str | None) -> list[str]:
    """``--tasks`` (comma-separated names or .yaml paths) checked before any model work."""
    if spec is None:
        return []
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise AllocatorError("--tasks is empty: name lm-eval tasks (arc_easy,hellaswag) or task .yaml files")
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise AllocatorError("--tasks needs lm-evaluation-harness: pip install 'allocator[eval]'") from None
    for task in tasks:
        if task.endswith((".yaml", ".yml")):
            _task_name(Path(task))
    return tasks


def _task_name(path: Path) -> str:
    """The ``task:`` (or a group file's ``group:``) a YAML file declares: lm-eval registers it under that name."""
    if not path.is_file():
        raise AllocatorError(f"--tasks: task file '{path}' does not exist")
    try:
        declared = yaml.safe_load(path.read_text())
        name = declared.get("group") if isinstance(declared.get("task"), list) else declared.get("task")
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError):
        name = None
    if not isinstance(name, str) or not name:
        raise AllocatorError(f"--tasks: '{path}' is not an lm-eval task file (no 'task: NAME', nor 'group: NAME' "
                             "with a task list, at its top level)")  # fmt: skip
    return name


def task_accuracy(model: nn.Module, tokenizer, tasks: list[str], batch_size: int, limit: int | None = None,
                  samples: int = 1000) -> dict:  # fmt: skip
    """Every metric lm-eval scores per item for each task, with its bootstrap interval, on ``model`` as it is."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    names = [_task_name(Path(t)) if t.endswith((".yaml", ".yml")) else t for t in tasks]
    folders = sorted({str(Path(t).resolve().parent) for t in tasks if t.endswith((".yaml", ".yml"))})
    device = str(next(model.parameters()).device)
    was_training = model.training
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    try:
        result = lm_eval.simple_evaluate(model=lm, tasks=names, limit=limit, log_samples=True, bootstrap_iters=0,
                                         task_manager=TaskManager(include_path=folders or None),
                                         verbosity="ERROR")  # fmt: skip
    except (KeyError, ValueError, OSError, ConnectionError) as exc:
        raise AllocatorError(f"--tasks: lm-eval could not run {', '.join(names)}: {first_line(exc, 300)}") from None
    finally:
        model.train(was_training)
    out = {}
    for name, items in result["samples"].items():  # every task lm-eval ran (a group's subtasks one by one)
        metrics = [
            m for m in (items[0]["metrics"] if items else []) if all(isinstance(i.get(m), (int, float)) for i in items)
        ]
        out[name] = {"items": len(items), "limit": limit, "metrics": {}}
        for metric in metrics:
            value, lo, hi = bootstrap_mean(np.array([float(i[metric]) for i in items]), samples)
            out[name]["metrics"][metric] = {"value": value, "lo": lo, "hi": hi}
        log.info("%s: %s", name, ", ".join(f"{m} {v['value']:.4f}" for m, v in out[name]["metrics"].items()))
    return out


def primary(result: dict) -> tuple[str, dict] | None:
    """The metric a table shows for one task's result (acc_norm, else acc, else exact_match, else the first); a
    task scored by no per-item number (only corpus-level metrics) has none: ``None``."""
    metrics = result["metrics"]
    name = next((m for m in PRIMARY if m in metrics), next(iter(metrics), None))
    return (name, metrics[name]) if name is not None else None
