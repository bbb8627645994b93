"""Run artefacts people look at: search history, Pareto front, and the Markdown report of runs."""

from __future__ import annotations

import html
import json
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pandas as pd

from allocator.errors import AllocatorError
from allocator.formats import storage_bits
from allocator.io import write_text_atomic
from allocator.levels import parse_level
from allocator.plan import Plan
from allocator.untrusted import check_count, check_finite, check_text, check_tree


def write_history(history: list[dict], out: Path) -> None:
    """``history.csv`` (one row per generation or trial, whatever the searcher records) and, for evolution's
    and optuna's records, ``history.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(history)
    write_text_atomic(out / "history.csv", df.to_csv(index=False))
    if "fitness" not in df or not {"generation", "trial"} & set(df):
        return  # another searcher's records: the table only
    fig, ax = plt.subplots(figsize=(6, 4))
    if "generation" in df:
        ax.plot(df["generation"], df["fitness"], marker=".")
        ax.set(xlabel="generation", ylabel="best fitness (KL to dense, last stage)", title="evolution")
    else:  # an optuna study: every trial, and the best so far
        ax.plot(df["trial"], df["fitness"], ".", alpha=0.5, label="trial")
        ax.plot(df["trial"], df["fitness"].cummin(), label="best so far")
        ax.set(xlabel="trial", ylabel="fitness (KL to dense)", yscale="log", title="optuna")
        ax.legend()
    save_figure(fig, out / "history.png")


def write_pareto(rows: list[dict], out: Path, x: str = "bytes") -> None:
    """``pareto.csv`` and ``pareto.png``: perplexity against model bytes (or predicted latency) of a front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(rows)
    write_text_atomic(out / "pareto.csv", df.to_csv(index=False))
    fig, ax = plt.subplots(figsize=(6, 4))
    df = df.sort_values(x)
    if x == "bytes":
        ax.plot(df["bytes"] / 2**20, df["perplexity"], "o-")
        ax.set(xlabel="compressible weights (MiB)")
    else:
        ax.plot(df[x], df["perplexity"], "o-")
        ax.set(xlabel="predicted latency (ms)")
    ax.set(ylabel="WikiText-2 perplexity", yscale="log", title="Pareto front")
    save_figure(fig, out / "pareto.png")


def save_figure(fig, path: Path) -> None:
    """Write a PNG atomically (temporary name, then rename) and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)


def write_run_report(folder: str | Path) -> Path:
    """``report.md`` for a run folder, or for a folder of run folders (one section each).

    Per run: budget, method, achieved costs and perplexity; a heatmap of the per-layer allocation
    (decoder block x layer role, colour = stored bits per weight, which reads the same for pruning,
    quantization or both); the search history and Pareto plots when the run has them. Several runs:
    also a table and a plot of perplexity against achieved bits per weight, one line per method.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AllocatorError(f"run folder {str(folder)!r} does not exist: pass a folder written by `allocator run`")
    runs = [folder] if (folder / "plan.json").is_file() else sorted(p.parent for p in folder.glob("*/plan.json"))
    if not runs:
        raise AllocatorError(f"{str(folder)!r} holds no run (no plan.json): pass a folder written by `allocator run`")
    lines = [f"# allocator report: {_md(folder)}", ""]
    rows = []
    loaded = [(run, *_read_run(run)) for run in runs]  # every file checked before a figure is drawn
    for run, plan, metrics in loaded:
        achieved = plan["achieved"]
        budget = f"{plan['budget']['kind']}={plan['budget']['value']:g}"
        rows.append({"run": _md(run.name), "method": _md(plan["method"]), "budget": budget,
                     "sparsity": achieved["sparsity"], "bits": achieved["bits"],
                     "perplexity": metrics.get("perplexity"), "dense perplexity": metrics.get("dense_perplexity"),
                     "KL": metrics.get("kl_to_dense")})  # fmt: skip
        plot_allocation(plan, run / "allocation.png")
        prefix = "" if run == folder else f"{quote(run.name)}/"
        summary = pd.DataFrame(rows[-1:]).round(4).to_markdown(index=False)
        lines += [f"## {_md(run.name)}", "", summary, "", f"![per-layer allocation]({prefix}allocation.png)", ""]
        if "latency" in metrics:
            lat = metrics["latency"]
            lines += [f"Predicted latency {lat['predicted_ms']:.4f} ms at {lat['tokens']} tokens "
                      f"(speed-up {lat['speedup']:.3f}x, table {_md(lat['table'])}).", ""]  # fmt: skip
        for name, title in (("history.png", "search history"), ("pareto.png", "Pareto front")):
            if (run / name).is_file():
                lines += [f"![{title}]({prefix}{name})", ""]
    if len(runs) > 1:
        df = pd.DataFrame(rows)
        lines[2:2] = [
            "## All runs",
            "",
            df.round(4).to_markdown(index=False),
            "",
            "![perplexity vs bits](perplexity.png)",
            "",
        ]
        _plot_perplexity(df, folder / "perplexity.png")
    path = folder / "report.md"
    write_text_atomic(path, "\n".join(lines))
    return path


def _read_run(run: Path) -> tuple[dict, dict]:
    """A run's plan (validated) and metrics, as JSON dicts."""
    plan = Plan.load(run / "plan.json").to_dict()
    path = run / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AllocatorError(f"{path} is not valid JSON ({exc}): re-run that run or move it away") from None
    if not isinstance(metrics, dict):
        raise AllocatorError(f"{path} is not a metrics object: re-run that run or move it away")
    check_tree(metrics, "metrics", str(path))
    for key in ("perplexity", "dense_perplexity", "kl_to_dense"):
        if metrics.get(key) is not None:
            check_finite(metrics[key], key, str(path))
    if "latency" in metrics:
        lat = metrics["latency"]
        for key in ("predicted_ms", "speedup"):
            check_finite(lat.get(key) if isinstance(lat, dict) else None, f"latency.{key}", str(path))
        check_count(lat.get("tokens"), "latency.tokens", str(path))
        check_text(lat.get("table"), "latency.table", str(path))
    return plan, metrics


def _md(text: object) -> str:
    """Text from a shared file as inert Markdown: HTML escaped, table pipes and link brackets defused."""
    escaped = html.escape(str(text))
    return "".join("\\" + ch if ch in "|[]`" else ch for ch in escaped)


def plot_allocation(plan: dict, path: Path) -> None:
    """Heatmap of stored bits per weight: decoder block x layer role."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from allocator.plan import Plan

    layers = Plan.from_dict(plan).layers
    cells: dict[tuple[int, str], float] = {}
    for name, level in plan["assignment"].items():
        block, role = layers[name]
        if role == "lm_head":
            continue
        rows, cols = plan["model"]["shapes"][name]
        cells[(block, role)] = storage_bits(parse_level(level), rows, cols) / (rows * cols)
    roles = list(dict.fromkeys(role for _, role in cells))
    blocks = 1 + max(b for b, _ in cells)
    grid = np.full((blocks, len(roles)), np.nan)
    for (b, role), bits in cells.items():
        grid[b, roles.index(role)] = bits
    fig, ax = plt.subplots(figsize=(1 + 0.6 * len(roles), 1.5 + 0.18 * blocks))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=16)
    ax.set_xticks(range(len(roles)), [r.split(".")[-1].removesuffix("_proj") for r in roles], rotation=90, fontsize=7)
    ax.set(ylabel="decoder block", title=f"{plan['method']}, {plan['budget']['kind']}={plan['budget']['value']:g}")
    fig.colorbar(im, ax=ax, label="stored bits / weight")
    save_figure(fig, path)


def _plot_perplexity(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, g in df.dropna(subset=["perplexity"]).groupby("method"):
        g = g.sort_values("bits")
        ax.plot(g["bits"], g["perplexity"], "o-", label=method)
    ax.set(xlabel="stored bits per weight (achieved)", ylabel="perplexity", yscale="log", title="perplexity vs budget")
    ax.legend(fontsize=8)
    save_figure(fig, path)
