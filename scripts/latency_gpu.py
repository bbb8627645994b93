"""Issue 7 on the GPU, one command: latency tables for SmolLM2-135M and Llama-3-8B shapes, then
predicted vs measured end-to-end latency of 12 plans per model at decode and prefill token counts.

    python scripts/latency_gpu.py --out $OUT           (on the GPU; see scripts/gpu_latency.sh)

Plans per token count: dense; uniform s0.5 (no kernel: runs dense), 2:4, w8 (decode only), w4g64,
w4g128; five seeded random mixes of those levels; and a knapsack plan held to a speed-up budget
through the table (halfway to the fastest plan the grid allows) over a synthetic per-level error,
to show a budget kept end to end.
Writes OUT/<model>.csv/.json (the tables) and OUT/latency_check.csv/.json.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from allocator.budget import Budget, build_problem  # noqa: E402
from allocator.inventory import Inventory  # noqa: E402
from allocator.latency.architectures import config_for, random_model  # noqa: E402
from allocator.latency.measure import (  # noqa: E402
    DECODE_TOKENS,
    PREFILL_TOKENS,
    Timer,
    check_plans,
    environment,
    measure_table,
)
from allocator.latency.table import LatencyModel  # noqa: E402
from allocator.levels import parse_grid  # noqa: E402
from allocator.search import allocate, make_searcher  # noqa: E402

GRID = parse_grid("dense,s0.5,2:4,w8,w4g64,w4g128")
# torch's int8 weight-only CUDA kernel takes seconds per forward at prefill sizes: w8 is checked at decode only
PREFILL_GRID = [lv for lv in GRID if lv.name != "w8"]
# synthetic relative error per level (only used to make the knapsack trade quality for time)
PROXY_ERROR = {"dense": 0.0, "s0.5": 0.3, "2:4": 0.35, "w8": 0.01, "w4g64": 0.08, "w4g128": 0.1}


def plans_for(inventory: Inventory, table, tokens: int, grid) -> dict[str, dict]:
    """The plans checked per model at one token count: uniform, random mixes, one knapsack."""
    names = [lay.name for lay in inventory.layers]
    plans = {f"uniform-{lv.name}": {n: lv for n in names} for lv in grid}
    for seed in range(5):
        rng = np.random.default_rng(seed)
        p = rng.dirichlet(np.ones(len(grid)))
        picks = rng.choice(len(grid), len(names), p=p)
        plans[f"random-{seed}"] = {n: grid[k] for n, k in zip(names, picks, strict=True)}
    # knapsack held to a speed-up halfway between dense and the fastest plan this grid allows
    latency = LatencyModel(table, tokens)
    fastest = build_problem(inventory, grid, Budget("latency", 1e9), latency=latency)
    best = table.dense_ms(inventory, tokens) / (table.overhead_ms(tokens) + fastest.cost.min(axis=1).sum())
    speedup = 1 + (best - 1) / 2
    if speedup > 1.001:
        problem = build_problem(inventory, grid, Budget("speedup", speedup), latency=latency)
        depth = 1 + problem.blocks / inventory.n_blocks
        problem = problem.with_sensitivity(depth[:, None] * np.array([PROXY_ERROR[lv.name] for lv in grid])[None, :])
        plans[f"knapsack-x{speedup:.3f}"] = allocate(problem, make_searcher("knapsack")).assignment
    return plans


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--models", default="smollm2-135m,llama-3-8b")
    ap.add_argument("--check-tokens", default="1,2048")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--tokens", default=",".join(map(str, DECODE_TOKENS + PREFILL_TOKENS)), help="table token counts")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the whole script")
    ap.add_argument("--report-only", action="store_true", help="only redraw OUT/latency_check.md/.png from its CSV")
    args = ap.parse_args()
    out = Path(args.out)
    if args.report_only:
        write_report(pd.read_csv(out / "latency_check.csv"), out)
        return
    out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    check_tokens = tuple(int(t) for t in args.check_tokens.split(","))
    tokens = tuple(int(t) for t in args.tokens.split(","))
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    env = environment(args.device)
    timer = Timer(args.device, repeats=args.repeats)
    rows = []
    for spec in args.models.split(","):
        t0 = time.perf_counter()
        model = random_model(config_for(spec), dtype, args.device)
        inventory = Inventory.from_model(model)
        meta = {"model": spec, "fingerprint": inventory.fingerprint, "command": command}
        table = measure_table(model, inventory, tokens, timer=timer, env=env, meta=meta)
        table.save(out / f"{spec}.csv")
        print(f"{spec}: table in {time.perf_counter() - t0:.0f} s", flush=True)
        for m in check_tokens:
            decode = m <= max(DECODE_TOKENS)
            plans = plans_for(inventory, table, m, GRID if decode else PREFILL_GRID)
            for r in check_plans(model, inventory, table, plans, (m,), timer, max_slowdown=20):
                rows.append({"model": spec, **r})
                print(rows[-1], flush=True)
        pd.DataFrame(rows).to_csv(out / "latency_check.csv", index=False)
        print(f"{spec}: done in {time.perf_counter() - t0:.0f} s", flush=True)
        del model
        if args.device == "cuda":
            torch.cuda.empty_cache()
    df = pd.DataFrame(rows)
    summary = {"command": command, **env, "plans_checked": int(df.plan.nunique()),
               "checks": len(df), "within_5pct": int((df.error_pct.abs() <= 5).sum()),
               "max_abs_error_pct": float(df.error_pct.abs().max())}  # fmt: skip
    (out / "latency_check.json").write_text(json.dumps({**summary, "rows": rows}, indent=1))
    write_report(df, out)
    print(json.dumps(summary), flush=True)


def write_report(df: pd.DataFrame, out: Path) -> None:
    """latency_check.md (the table) and latency_check.png (predicted vs measured, one panel per token count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = df[df.measured_ms.notna()]
    cols = ["model", "plan", "tokens", "predicted_ms", "measured_ms", "error_pct", "predicted_speedup",
            "measured_speedup"]  # fmt: skip
    within = int((ran.error_pct.abs() <= 5).sum())
    text = (f"Predicted vs measured end-to-end latency (CUDA graphs, bf16, one forward of TOKENS tokens).\n\n"
            f"{within} of {len(ran)} checks within 5 %; max |error| {ran.error_pct.abs().max():.2f} %.\n\n"
            f"{ran[cols].round(4).to_markdown(index=False)}\n")  # fmt: skip
    skipped = df[df.measured_ms.isna()]
    if len(skipped):
        listed = skipped[["model", "plan", "tokens", "skipped"]].to_markdown(index=False)
        text += f"\nNot run (predicted too slow):\n\n{listed}\n"
    (out / "latency_check.md").write_text(text)
    groups = list(ran.groupby(["model", "tokens"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.6 * len(groups), 3.6), squeeze=False)
    for ax, ((model, tokens), g) in zip(axes[0], groups, strict=True):
        ax.loglog(g.measured_ms, g.predicted_ms, "o", ms=4)
        lo, hi = (
            g[["measured_ms", "predicted_ms"]].min().min() * 0.9,
            g[["measured_ms", "predicted_ms"]].max().max() * 1.1,
        )
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.fill_between([lo, hi], [lo * 0.95, hi * 0.95], [lo * 1.05, hi * 1.05], color="0.85", label="±5 %")
        ax.set(title=f"{model}, {tokens} tokens", xlabel="measured (ms)", ylabel="predicted (ms)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "latency_check.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
