"""A table and a plot from the log of ``allocator latency check`` run over several plans (as the ``check30`` call of
scripts/gpu_real_model.sh writes it: a ``== PLAN`` line, then one line per token count).

    python scripts/latency_check_table.py --log results/latency_check_issue30.log --out results/latency_check_issue30
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from allocator.errors import first_line  # noqa: E402
from allocator.io import write_text_atomic  # noqa: E402
from allocator.report import save_figure  # noqa: E402

LINE = re.compile(r"^\s*(\d+) tokens: predicted ([\d.]+) ms\s+measured ([\d.]+) ms\s+error ([+-][\d.]+) %\s+"
                  r"speed-up measured ([\d.]+)x")  # fmt: skip


def parse(text: str) -> pd.DataFrame:
    """One row per (plan, token count)."""
    rows, plan = [], None
    for line in text.splitlines():
        if line.startswith("== "):
            plan = Path(line[3:].strip()).stem
        elif (m := LINE.match(line)) and plan:
            rows.append({"plan": plan, "tokens": int(m[1]), "predicted_ms": float(m[2]), "measured_ms": float(m[3]),
                         "error_pct": float(m[4]), "measured_speedup": float(m[5])})  # fmt: skip
    if not rows:
        raise ValueError("no `latency check` lines in the log: pass the log the check30 call wrote")
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    try:
        df = parse(Path(args.log).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        print(f"error: {first_line(exc)}", file=sys.stderr)
        raise SystemExit(2) from exc
    out = Path(args.out)
    write_text_atomic(out.with_suffix(".csv"), df.to_csv(index=False))
    lines = [f"`python {shlex.join(sys.argv)}`\n", "| plan | tokens | predicted ms | measured ms | error % | measured "
             "speed-up |", "|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r.plan} | {r.tokens} | {r.predicted_ms:.3f} | {r.measured_ms:.3f} | {r.error_pct:+.2f} | "
              f"{r.measured_speedup:.3f}x |" for r in df.itertuples()]  # fmt: skip
    lines.append(f"\n|error| at most {df.error_pct.abs().max():.2f} %, median {df.error_pct.abs().median():.2f} % "
                 f"over {len(df)} (plan, token count) pairs.")  # fmt: skip
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for tokens, g in df.groupby("tokens"):
        ax.scatter(g.measured_ms, g.predicted_ms, label=f"{tokens} tokens")
    lim = [0, df[["measured_ms", "predicted_ms"]].to_numpy().max() * 1.05]
    ax.plot(lim, lim, color="grey", lw=0.8)
    ax.set(xlabel="measured ms (whole forward)", ylabel="predicted ms (table)", xlim=lim, ylim=lim,
           title="latency check of the plans")  # fmt: skip
    ax.legend()
    save_figure(fig, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
