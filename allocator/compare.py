"""``allocator compare``: methods x budgets x evaluation texts in one command, on one loaded model.

A method may carry its own options, ``evolution:start=knapsack:generations=20`` (any option its searcher
declares), so two settings of one method are two columns. Each cell (budget, method) is an ordinary run
folder (plan.json, metrics.json, config.json) under ``OUT/<budget>/<method>/``, plus ``eval.json``: the
plan's perplexity on every evaluation text with a bootstrap interval over windows. A cell with
``eval.json`` is done, so a killed comparison continues where it stopped. The summary
(``compare.csv``/``.md``), one plot per text and the per-layer allocation of every plan are rewritten from
the cells at the end. Every method sees the same model, calibration windows, backend and grid; uniform is
the yardstick the table states every method against.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from allocator import data
from allocator.errors import AllocatorError
from allocator.evaluate import bootstrap_mean, paired_ratio, window_nll
from allocator.io import check_output, write_json_atomic, write_text_atomic
from allocator.pipeline import run
from allocator.report import plot_allocation, save_figure
from allocator.search import SEARCHERS
from allocator.session import Session
from allocator.spec import RunConfig, resolve
from allocator.tasks import parse_tasks, primary, task_accuracy


def bootstrap_perplexity(nll: np.ndarray, samples: int = 1000, level: float = 0.95) -> tuple[float, float, float]:
    """Perplexity of windows with mean token NLLs ``nll`` (equal-length windows) and its percentile
    bootstrap interval over windows (seeded: the same NLLs give the same interval)."""
    mean, lo, hi = bootstrap_mean(nll, samples, level)
    return math.exp(mean), math.exp(lo), math.exp(hi)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_")


def compare(config: RunConfig, methods: list[str], targets: list[str], texts: list[str], out: str | Path,
            samples: int = 1000, command: str = "") -> pd.DataFrame:  # fmt: skip
    """Run every method at every target, evaluate each plan on every text; returns the summary table."""
    if not methods or not targets or not texts:
        raise AllocatorError("compare needs at least one --methods, --targets and --eval text each")
    out = Path(out)
    check_output(out, "--output-dir")
    config = replace(config, eval=texts[0])
    cells = {}  # every cell resolved (and its searcher built) before the model is loaded
    for target in targets:
        for method in methods:
            name, options = method_options(method, config.options)
            cell = out / _slug(target) / _slug(method)
            cells[cell] = resolve(replace(config, method=name, options=options, target=target, output_dir=str(cell)))
    session = Session(config)
    # the first text's windows are the session's own evaluation windows: tokenized once
    windows = {text: session.eval_seqs if i == 0 else _windows(session, text, config) for i, text in enumerate(texts)}
    _ = session.dense  # measured (or cached) once, with its per-window NLLs on the first text
    known = {texts[0]: session.dense_window_nll} if session.dense_window_nll is not None else {}
    dense = _evaluate(session, windows, config.batch_size, samples, known, restore=True)
    if config.tasks:  # the dense model's accuracy: the yardstick of every plan's
        dense["tasks"] = task_accuracy(session.model, session.loaded.tokenizer, parse_tasks(config.tasks),
                                       config.batch_size, config.tasks_limit, samples)  # fmt: skip
    write_json_atomic(out / "dense" / "eval.json", dense)
    for cell, spec in cells.items():
        if (cell / "eval.json").is_file():
            continue  # done before a kill: kept
        t0 = time.perf_counter()
        done = run(spec, session)  # leaves the model compressed to the plan, scored on the first text's windows
        evals = _evaluate(session, windows, config.batch_size, samples, {texts[0]: done.metrics["window_nll"]})
        write_json_atomic(cell / "eval.json", {**evals, "wall_s": time.perf_counter() - t0})
    return write_summary(out, methods, targets, texts, command, samples)


def method_options(spec: str, base: dict) -> tuple[str, dict]:
    """``NAME[:OPTION=VALUE...]`` -> the method and its options (``base`` overridden; its searcher checks them)."""
    name, *pairs = spec.split(":")
    if name not in SEARCHERS:
        raise AllocatorError(f"unknown method {name!r} in {spec!r}: choose from {', '.join(SEARCHERS)}")
    kinds = {f.name: f.metadata["kind"] for f in SEARCHERS[name].options()}
    options = dict(base)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.replace("-", "_")
        if not sep or key not in kinds:
            raise AllocatorError(f"{spec!r}: write {name}:OPTION=VALUE with OPTION one of {', '.join(kinds) or 'none'}")
        try:
            options[key] = value.lower() in ("1", "true", "yes") if kinds[key] is bool else kinds[key](value)
        except ValueError:
            raise AllocatorError(f"{spec!r}: {key} takes a {kinds[key].__name__}, got {value!r}") from None
    return name, options


def _windows(session: Session, text: str, config: RunConfig) -> torch.Tensor:
    tokenizer, records = session.loaded.tokenizer, data.load_records(text)
    return data.evaluation_sequences(tokenizer, records, config.seq_len, config.eval_samples, session.bos)


def _evaluate(session: Session, windows: dict[str, torch.Tensor], batch_size: int, samples: int,
              known: dict | None = None, restore: bool = False) -> dict:  # fmt: skip
    """Per text: perplexity, its interval and the per-window NLLs (``known``: texts already scored, not run again)."""
    if restore:
        session.restore_()
    out, known = {}, known or {}
    for text, seqs in windows.items():
        nll = np.asarray(known[text]) if text in known else window_nll(session.model, seqs, batch_size)
        ppl, lo, hi = bootstrap_perplexity(nll, samples)
        out[text] = {"perplexity": ppl, "lo": lo, "hi": hi, "windows": len(nll), "tokens": int(seqs[:, 1:].numel()),
                     "window_nll": nll.tolist()}  # fmt: skip
    return out


def write_summary(out: Path, methods: list[str], targets: list[str], texts: list[str],
                  command: str = "", samples: int = 1000) -> pd.DataFrame:  # fmt: skip
    """compare.csv/.md, one plot per text and every plan's allocation heatmap, from the cell folders."""
    dense = json.loads((out / "dense" / "eval.json").read_text())
    rows = []
    for target in targets:
        base = _uniform_nll(out / _slug(target), methods)
        for method in methods:
            cell = out / _slug(target) / _slug(method)
            metrics = json.loads((cell / "metrics.json").read_text())
            evals = json.loads((cell / "eval.json").read_text())
            plot_allocation(json.loads((cell / "plan.json").read_text()), cell / "allocation.png")
            for text in texts:
                nll, ref = evals[text].pop("window_nll", None), base.get(text)
                paired = paired_ratio(nll, ref, samples) if nll and ref and len(nll) == len(ref) else (np.nan,) * 3
                rows.append({"target": target, "method": method, "text": text, **evals[text],
                             "ratio_lo": paired[1], "ratio_hi": paired[2],
                             "dense": dense[text]["perplexity"], "sparsity": metrics["achieved"]["sparsity"],
                             "bits": metrics["achieved"]["bits"], "kl_to_dense": metrics["kl_to_dense"],
                             "search_s": metrics["timings"].get("search_s", 0.0),
                             "wall_s": evals.get("wall_s", np.nan)})  # fmt: skip
    df = pd.DataFrame(rows)
    uniform = df[df.method == "uniform"].set_index(["target", "text"]).perplexity
    df["vs_uniform"] = [r.perplexity / uniform.get((r.target, r.text), np.nan) for r in df.itertuples()]
    write_text_atomic(out / "compare.csv", df.to_csv(index=False))
    lines = [f"# allocator compare\n\n`{command}` (each cell's settings: its config.json)\n"]
    for text in texts:
        sub = df[df.text == text]
        cells = sub.assign(cell=[f"{r.perplexity:.2f} [{r.lo:.2f}, {r.hi:.2f}]" for r in sub.itertuples()])
        table = cells.pivot(index="target", columns="method", values="cell").reindex(index=targets, columns=methods)
        lines += [f"## {text} (dense {dense[text]['perplexity']:.2f})", "",
                  "perplexity [95 % bootstrap interval over windows]", "", table.to_markdown(), "",
                  "perplexity / uniform's [95 % paired bootstrap interval: both resampled with the same windows]", "",
                  _ratio_table(sub, methods, targets), "",
                  f"![perplexity]({_slug(Path(text).name)}.png)", ""]  # fmt: skip
        _plot(sub, methods, targets, dense[text]["perplexity"], text, out / f"{_slug(Path(text).name)}.png")
    lines += _task_tables(out, methods, targets, dense.get("tasks", {}))
    write_text_atomic(out / "compare.md", "\n".join(lines))
    return df


def _ratio_table(sub: pd.DataFrame, methods: list[str], targets: list[str]) -> str:
    cells = sub.assign(cell=[f"{r.vs_uniform:.3f} [{r.ratio_lo:.3f}, {r.ratio_hi:.3f}]" for r in sub.itertuples()])
    return cells.pivot(index="target", columns="method", values="cell").reindex(index=targets, columns=methods)\
        .to_markdown()  # fmt: skip


def _uniform_nll(folder: Path, methods: list[str]) -> dict:
    """Uniform's per-window NLLs per text at one target (empty without a uniform cell or from an older cell)."""
    if "uniform" not in methods:
        return {}
    evals = json.loads((folder / "uniform" / "eval.json").read_text())
    return {text: e.get("window_nll") for text, e in evals.items() if isinstance(e, dict)}


def _task_tables(out: Path, methods: list[str], targets: list[str], dense: dict) -> list[str]:
    """``tasks.csv`` and one markdown table per lm-eval task (its primary metric), when the cells scored tasks."""
    rows = []
    for target in targets:
        for method in methods:
            tasks = json.loads((out / _slug(target) / _slug(method) / "metrics.json").read_text()).get("tasks", {})
            for task, result in tasks.items():
                for metric, v in result["metrics"].items():
                    base = dense.get(task, {}).get("metrics", {}).get(metric, {}).get("value", np.nan)
                    rows.append({"target": target, "method": method, "task": task, "metric": metric, **v,
                                 "items": result["items"], "dense": base,
                                 "primary": metric == primary(result)[0]})  # fmt: skip
    if not rows:
        return []
    df = pd.DataFrame(rows)
    write_text_atomic(out / "tasks.csv", df.to_csv(index=False))
    lines = []
    for (task, metric), sub in df[df.primary].groupby(["task", "metric"], sort=False):
        cells = sub.assign(cell=[f"{r.value:.4f} [{r.lo:.4f}, {r.hi:.4f}]" for r in sub.itertuples()])
        table = cells.pivot(index="target", columns="method", values="cell").reindex(index=targets, columns=methods)
        lines += [f"## lm-eval {task}: {metric} (dense {sub.dense.iloc[0]:.4f}, {sub['items'].iloc[0]} items)", "",
                  f"{metric} [95 % bootstrap interval over items]", "", table.to_markdown(), ""]  # fmt: skip
    return lines


def _plot(df: pd.DataFrame, methods: list[str], targets: list[str], dense: float, text: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = np.arange(len(targets))
    for i, method in enumerate(methods):
        g = df[df.method == method].set_index("target").reindex(targets)
        err = np.vstack([g.perplexity - g.lo, g.hi - g.perplexity])
        ax.errorbar(x + 0.06 * (i - len(methods) / 2), g.perplexity, yerr=err, fmt="o-", capsize=3, label=method)
    ax.axhline(dense, color="grey", ls=":", label="dense")
    ax.set_xticks(x, targets, rotation=20, fontsize=8)
    ax.set(ylabel="perplexity", yscale="log", title=Path(text).name)
    ax.legend(fontsize=8)
    save_figure(fig, path)
