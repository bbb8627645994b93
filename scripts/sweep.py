"""Run ``allocator run`` over several budgets / methods / backends and tabulate + plot the results.

Example (issue 2's figures):
    python scripts/sweep.py --targets sparsity=0.3,sparsity=0.5,sparsity=0.7 --out results/uniform_magnitude
Writes OUT.csv, OUT.json and OUT.png; each run's folder goes under runs/ (not committed).
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from allocator.io import write_json_atomic, write_text_atomic  # noqa: E402
from allocator.pipeline import run  # noqa: E402
from allocator.session import RunConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", required=True, help="comma-separated budgets")
    ap.add_argument("--methods", default="uniform")
    ap.add_argument("--backends", default="magnitude")
    ap.add_argument("--levels", default=RunConfig.levels)
    ap.add_argument("--eval-samples", type=int, default=RunConfig.eval_samples)
    ap.add_argument("--out", required=True, help="path prefix of the result files")
    args = ap.parse_args()
    rows = []
    for target, method, backend in itertools.product(
        args.targets.split(","), args.methods.split(","), args.backends.split(",")
    ):
        out_dir = f"runs/sweep/{method}-{backend}-{target}"
        cfg = RunConfig(target=target, method=method, backend=backend, levels=args.levels,
                        eval_samples=args.eval_samples, output_dir=out_dir)  # fmt: skip
        m = run(cfg).metrics
        rows.append({"target": target, "method": method, "backend": backend,
                     "achieved_sparsity": m["achieved"]["sparsity"], "achieved_bits": m["achieved"]["bits"],
                     "dense_ppl": m["dense_perplexity"], "ppl": m["perplexity"], "kl": m["kl_to_dense"],
                     "eval_tokens": m["eval_tokens"], "compress_s": m["timings"]["compress_s"]})  # fmt: skip
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    out = Path(args.out)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    write_text_atomic(out.with_suffix(".csv"), df.to_csv(index=False))
    write_json_atomic(out.with_suffix(".json"), {"command": command, "rows": rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for (method, backend), g in df.groupby(["method", "backend"]):
        ax.plot(g["achieved_sparsity"], g["ppl"], marker="o", label=f"{method} / {backend}")
    ax.axhline(df["dense_ppl"].iloc[0], color="gray", ls="--", label="dense")
    ax.set(xlabel="achieved sparsity", ylabel="WikiText-2 test perplexity", yscale="log", title=out.name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
