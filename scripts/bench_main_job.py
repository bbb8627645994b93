"""Wall time of the README's main job, without and with the dense-reference cache, side by side in one run.

    python scripts/bench_main_job.py --out results/bench_main_job

Runs ``allocator run --target sparsity=0.5 --method uniform`` (the README's command) as a fresh process:
once with ``--no-dense-cache`` (the dense model evaluated every time: the baseline), then twice with an
empty dense cache (the first run fills it, the second reuses it). The converted model stays cached, as
on any machine after its first run. Writes OUT.json (per run: wall seconds, the run's own timings and
its perplexity/KL, which must agree) and OUT.png.
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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from allocator.io import write_json_atomic  # noqa: E402
from allocator.model import cache_dir  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of the three runs")
    args = ap.parse_args()
    out = Path(args.out)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # the converted model is reused from the usual cache; dense entries go to a fresh folder each round
        for r in range(args.repeats):
            cache = Path(tmp) / f"cache{r}"
            cache.mkdir()
            for src in cache_dir().iterdir():
                if src.name != "dense":
                    (cache / src.name).symlink_to(src.resolve())
            for label, extra in (("no cache (baseline)", ["--no-dense-cache"]), ("first run (fills the cache)", []),
                                 ("second run (cached)", [])):  # fmt: skip
                run_dir = Path(tmp) / f"run{r}-{len(rows)}"
                argv = [sys.executable, "-m", "allocator.cli", "run", "--target", "sparsity=0.5", "--method",
                        "uniform", "-o", str(run_dir), *extra]  # fmt: skip
                t0 = time.perf_counter()
                subprocess.run(argv, check=True, env={**os.environ, "ALLOCATOR_CACHE": str(cache)},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
                wall = time.perf_counter() - t0
                m = json.loads((run_dir / "metrics.json").read_text())
                rows.append({"round": r, "run": label, "wall_s": wall, "dense_cached": m["dense_cached"],
                             "perplexity": m["perplexity"], "kl_to_dense": m["kl_to_dense"],
                             "dense_perplexity": m["dense_perplexity"], **m["timings"]})  # fmt: skip
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in rows[-1].items()}, flush=True)
    write_json_atomic(out.with_suffix(".json"), {"command": command, "threads": os.environ.get("OMP_NUM_THREADS"),
                                                 "cpus": os.cpu_count(), "rows": rows})  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 3.5))
    parts = ("load_s", "dense_eval_s", "compress_s", "eval_s")
    labels = [f"{row['run']} #{row['round']}" for row in rows]
    left = [0.0] * len(rows)
    for part in parts:
        values = [row.get(part, 0.0) for row in rows]
        ax.barh(labels, values, left=left, label=part)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.barh(labels, [row["wall_s"] - lft for row, lft in zip(rows, left, strict=True)], left=left,
            label="other (imports, data)", color="lightgrey")  # fmt: skip
    ax.axvline(60, color="k", ls="--", lw=1)
    ax.set_xlabel("seconds (wall)")
    ax.set_title(f"README main job on {os.cpu_count()} CPU cores")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    tmp_png = out.with_name(f".{out.name}.png.tmp")
    fig.savefig(tmp_png, format="png", dpi=110)
    tmp_png.replace(out.with_suffix(".png"))


if __name__ == "__main__":
    main()
