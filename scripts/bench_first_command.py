"""Issue 34: the README's first command (uniform beside allocator's default knapsack at one budget), timed on this
machine's CPUs the first and the second time, and the default knapsack on a CPU — the Fisher prior alone — beside
the fitted sensitivity it replaced there, on WikiText-2 and on held-out C4 documents never used to calibrate.

    python scripts/bench_first_command.py --out results/first_command

Every command runs as a fresh process; the converted model is reused from the usual cache (as on any machine after
its first run), profiles and dense references go to a fresh cache. The sensitivity comparison's folders live under
``--work`` (resumable: a finished cell is kept). Writes OUT.json, OUT.md and OUT.png.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sensitivity import split_c4  # noqa: E402

from allocator.data import default_calibration, default_evaluation  # noqa: E402
from allocator.io import write_json_atomic, write_text_atomic  # noqa: E402
from allocator.model import cache_dir  # noqa: E402
from allocator.report import save_figure  # noqa: E402

FIRST = ["compare", "--methods", "uniform,knapsack", "--targets", "sparsity=0.6", "--backend", "wanda",
         "--calib-samples", "8", "--eval-samples", "8", "--kl-samples", "2", "--dtype", "bfloat16"]  # fmt: skip
SMALL = ["--calib-samples", "32", "--eval-samples", "16", "--kl-samples", "4"]  # the sensitivity comparison's sizes
TARGETS = "sparsity=0.5;sparsity=0.6;sparsity=0.7"
SETTINGS = {  # label: (methods, extra flags)
    "default on a CPU: the Fisher prior alone": ("uniform,knapsack", []),
    "fitted, the CPU's amount (16 plans + 1 round on 2 windows)": ("knapsack", ["--sensitivity", "fitted"]),
}


def allocator(argv: list[str], cache: Path) -> tuple[float, str]:
    """Run ``allocator ARGV`` as a fresh process; its wall seconds and what it printed."""
    t0 = time.perf_counter()
    env = {**os.environ, "ALLOCATOR_CACHE": str(cache)}
    done = subprocess.run([sys.executable, "-m", "allocator.cli", *argv], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"allocator {shlex.join(argv)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - t0, done.stdout


def fresh_cache(root: Path) -> Path:
    """A cache holding only the converted model (linked from the usual cache)."""
    root.mkdir(parents=True)
    for src in cache_dir().iterdir():
        if src.name == "models":
            (root / src.name).symlink_to(src.resolve())
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=None, help="the sensitivity comparison's folders (default: OUT_work)")
    ap.add_argument("--held-out-docs", type=int, default=400)
    ap.add_argument("--skip-sensitivity", action="store_true", help="only the first command")
    ap.add_argument("--before", default=None, help="an earlier OUT.json whose 'GPU defaults on the CPU' rows to show")
    args = ap.parse_args()
    out = Path(args.out)
    work = Path(args.work or f"{out}_work")
    result: dict = {"command": "python " + shlex.join(sys.argv), "threads": os.environ.get("OMP_NUM_THREADS", ""),
                    "cpus": os.cpu_count(), "first_command": "allocator " + shlex.join(FIRST), "runs": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cache = fresh_cache(tmp / "cache")
        for label in ("first run", "second run (cached)"):
            wall, printed = allocator([*FIRST, "-o", str(tmp / label.split()[0])], cache)
            result["runs"].append({"run": label, "wall_s": wall, "printed": printed})
            print(f"{label}: {wall:.1f} s\n{printed}", flush=True)
    if not args.skip_sensitivity:
        result["cpu_defaults"] = sensitivity_rows(work, args.held_out_docs)
    if args.before:
        old = json.loads(Path(args.before).read_text()).get("cpu_defaults", [])
        result["gpu_fit_on_cpu"] = [r for r in old if r["setting"].startswith("before")]
    write_json_atomic(out.with_suffix(".json"), result)
    write_summary(result, out)


def sensitivity_rows(work: Path, held_out_docs: int) -> list[dict]:
    """Each setting's compare over TARGETS on WikiText-2 and held-out C4, in one cache (one profile for all)."""
    work.mkdir(parents=True, exist_ok=True)
    calib, held_out = split_c4(Path(default_calibration()), held_out_docs, work)
    cache = work / "cache"
    if not cache.exists():
        fresh_cache(cache)
    rows = []
    for label, (methods, extra) in SETTINGS.items():
        folder = work / ("fitted" if extra else "default")
        argv = ["compare", "--methods", methods, "--targets", TARGETS, "--backend", "wanda", "--calib", calib,
                "--texts", f"{default_evaluation()},{held_out}", *SMALL, *extra, "-o", str(folder)]  # fmt: skip
        wall, _ = allocator(argv, cache)
        for r in pd.read_csv(folder / "compare.csv").itertuples():
            rows.append({"setting": label, "target": r.target, "method": r.method, "text": Path(r.text).name,
                         "perplexity": r.perplexity, "lo": r.lo, "hi": r.hi, "cell_wall_s": r.wall_s,
                         "command_wall_s": wall})  # fmt: skip
        print(pd.DataFrame(rows).to_string(), flush=True)
    return rows


def write_summary(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"# The first command (issue 34)\n\n`{result['command']}` on {result['cpus']} CPU cores\n",
             f"`{result['first_command']}`:\n", "| run | wall s |", "|---|---|"]  # fmt: skip
    lines += [f"| {r['run']} | {r['wall_s']:.1f} |" for r in result["runs"]]
    lines += ["", "What it printed (second run):", "", "```", result["runs"][-1]["printed"].strip(), "```"]
    if "cpu_defaults" in result:
        df = pd.DataFrame(result["cpu_defaults"] + result.get("gpu_fit_on_cpu", []))
        df["target"] = df["target"].fillna("sparsity=0.6")  # the earlier rows were measured at 0.6 only
        lines += ["", "## The default knapsack on a CPU (Wanda; 32 calibration / 16 evaluation windows)", "",
                  "Uniform is the same in every setting (it reads no sensitivity). Cell wall time includes the "
                  "profile where the cell measured it (the first knapsack cell of a setting).", "",
                  "| setting | target | method | text | perplexity [95 % interval] | cell wall s |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r.setting} | {r.target} | {r.method} | {r.text} | {r.perplexity:.2f} [{r.lo:.2f}, {r.hi:.2f}] "
                  f"| {r.cell_wall_s:.0f} |" for r in df.itertuples()]  # fmt: skip
        if result.get("gpu_fit_on_cpu"):
            lines += ["", "(The 'before' rows: the default until issue 34, the GPU's amount of fitting on the CPU, "
                      "measured by the earlier version of this script on the same data and sizes.)"]  # fmt: skip
        fig, ax = plt.subplots(figsize=(7, 4))
        knap = df[df.method == "knapsack"]
        for setting, g in knap.groupby("setting", sort=False):
            ax.scatter(g.cell_wall_s, g.perplexity, label=setting)
            for r in g.itertuples():
                ax.annotate(f"{r.target.split('=')[-1]} {r.text}", (r.cell_wall_s, r.perplexity), fontsize=6)
        ax.set(xlabel="knapsack cell wall time (s, 2 CPU cores)", ylabel="perplexity", yscale="log",
               title="default knapsack on a CPU")  # fmt: skip
        ax.legend(fontsize=7)
        save_figure(fig, out.with_suffix(".png"))
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
