"""Issue 3's table: SmolLM2-135M WikiText-2 perplexity, uniform allocation, every backend at its levels.

One session: the model is loaded and the dense reference measured once; each (backend, level) starts
from the dense weights. Data backends calibrate sequentially on --calib-samples C4 windows.

    python scripts/backend_table.py --out results/backends
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from allocator.io import write_json_atomic, write_text_atomic  # noqa: E402
from allocator.levels import parse_level  # noqa: E402
from allocator.session import RunConfig, Session  # noqa: E402

PRUNING = ["s0.3", "s0.4", "s0.5", "s0.6", "s0.7", "2:4"]
QUANT = ["w8", "w4g128", "w3g128", "w2g128"]
GRID = {"magnitude": PRUNING, "wanda": PRUNING, "sparsegpt": PRUNING, "rtn": QUANT, "gptq": QUANT}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--backends", default=",".join(GRID))
    ap.add_argument("--order", default=None, help="backend:level,... to run first (cheapest first)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    # resumable: rows already in OUT.json are kept and their configurations skipped
    rows = json.loads(out.with_suffix(".json").read_text())["rows"] if out.with_suffix(".json").is_file() else []
    done = {(r["backend"], r["level"]) for r in rows}
    todo = [(b, n) for b in args.backends.split(",") for n in GRID[b]]
    if args.order:
        first = [tuple(item.split(":", 1)) for item in args.order.split(",")]
        todo = [c for c in first if c in todo] + [c for c in todo if c not in first]
    todo = [c for c in todo if c not in done]
    session = Session(RunConfig(calib_samples=args.calib_samples, eval_samples=args.eval_samples))
    for backend, name in todo:
        level = parse_level(name)
        t0 = time.perf_counter()
        m = session.evaluate({lay.name: level for lay in session.inventory.layers}, backend)
        rows.append({"backend": backend, "level": name, "kind": level.kind,
                     "sparsity": m["achieved"]["sparsity"], "bits": m["achieved"]["bits"],
                     "dense_ppl": m["dense_perplexity"], "ppl": m["perplexity"], "kl": m["kl_to_dense"],
                     "calibration_tokens": m["calibration_tokens"], "eval_tokens": m["eval_tokens"],
                     "compress_s": m["timings"]["compress_s"], "total_s": time.perf_counter() - t0})  # fmt: skip
        print(rows[-1], flush=True)
        write_outputs(rows, out, command)


def write_outputs(rows: list[dict], out: Path, command: str) -> None:
    """Table (CSV, JSON, Markdown) and plot of the rows so far; called after every row."""
    df = pd.DataFrame(rows)
    write_text_atomic(out.with_suffix(".csv"), df.to_csv(index=False))
    write_json_atomic(out.with_suffix(".json"), {"command": command, "rows": rows})
    table = df.pivot_table(index="level", columns="backend", values="ppl").reindex(PRUNING + QUANT).dropna(how="all")
    write_text_atomic(out.with_suffix(".md"), f"`{command}`\n\n" + table.round(2).to_markdown() + "\n")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for backend, g in df[df.kind.isin(["sparsity"])].groupby("backend"):
        a.plot(g["sparsity"], g["ppl"], marker="o", label=backend)
    for backend, g in df[df.kind == "nm"].groupby("backend"):
        a.scatter(g["sparsity"], g["ppl"], marker="x", s=60, label=f"{backend} 2:4")
    for backend, g in df[df.kind == "bits"].groupby("backend"):
        b.plot(g["bits"], g["ppl"], marker="o", label=backend)
    for ax, x in ((a, "sparsity"), (b, "average bits (scales included)")):
        ax.axhline(df["dense_ppl"].iloc[0], color="gray", ls="--", label="dense")
        ax.set(xlabel=x, ylabel="WikiText-2 test perplexity", yscale="log")
        ax.legend(fontsize=8)
    a.set_title("pruning, uniform")
    b.set_title("quantization, uniform")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
