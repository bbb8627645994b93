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
    ax.plot(df["generation"], df["fitness"], marker=".")
    ax.set(xlabel="generation", ylabel="best fitness (KL to dense, last stage)", title="evolution")
    fig.tight_layout()
    tmp = out / ".history.png.tmp"
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(out / "history.png")
