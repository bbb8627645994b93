"""Run artefacts people look at: the search history as CSV and as a plot."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from allocator.io import write_text_atomic


def write_history(history: list[dict], out: Path) -> None:
    """``history.csv`` (generation, fitness, time, tokens, block-forwards) and ``history.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(history)
    write_text_atomic(out / "history.csv", df.to_csv(index=False))
    fig, ax = plt.subplots(figsize=(6, 4))
    if "generation" in df:
        ax.plot(df["generation"], df["fitness"], marker=".")
        ax.set(xlabel="generation", ylabel="best fitness (KL to dense, last stage)", title="evolution")
    else:  # an optuna study: every trial, and the best so far
        ax.plot(df["trial"], df["fitness"], ".", alpha=0.5, label="trial")
        ax.plot(df["trial"], df["fitness"].cummin(), label="best so far")
        ax.set(xlabel="trial", ylabel="fitness (KL to dense)", yscale="log", title="optuna")
        ax.legend()
    _save_figure(fig, out / "history.png")


def write_pareto(rows: list[dict], out: Path) -> None:
    """``pareto.csv`` and ``pareto.png``: perplexity against model bytes of a multi-objective study's front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = pd.DataFrame(rows)
    write_text_atomic(out / "pareto.csv", df.to_csv(index=False))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(df["bytes"] / 2**20, df["perplexity"], "o-")
    ax.set(xlabel="compressible weights (MiB)", ylabel="WikiText-2 perplexity", yscale="log", title="Pareto front")
    _save_figure(fig, out / "pareto.png")


def _save_figure(fig, path: Path) -> None:
    """Write a PNG atomically (temporary name, then rename) and free the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
