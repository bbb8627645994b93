"""Issue 33: does evolution improve a strong start? The fitted knapsack, EvoPress-style evolution from it and guided
evolution from it, at the same budget, backend and data, on the real model.

For each setting (backend:target) and calibration seed, one session runs the three methods in turn; each plan is
scored on WikiText-2 and on held-out C4 documents (never calibrated on), and each search's parent is scored after
the search on the held-out calibration windows (the KL the run reports) at every generation it changed, against
the candidate tokens spent so far: the convergence plot.

GPU (device tool, after `bash scripts/gpu_real_model.sh stage`):
    bash scripts/gpu_real_model.sh guided
CPU smoke run:
    python scripts/bench_guided.py --settings wanda:sparsity=0.6 --seeds 0 --calib-samples 16 --eval-samples 4 \
        --seq-len 128 --generations 3 --out /tmp/guided
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sensitivity import split_c4  # noqa: E402

from allocator import data  # noqa: E402
from allocator.budget import Budget, build_problem  # noqa: E402
from allocator.compare import _evaluate, _windows  # noqa: E402
from allocator.fitness import KLFitness  # noqa: E402
from allocator.io import write_json_atomic, write_text_atomic  # noqa: E402
from allocator.levels import parse_grid  # noqa: E402
from allocator.pipeline import run  # noqa: E402
from allocator.report import save_figure  # noqa: E402
from allocator.search.fitted import GPU_FIT  # noqa: E402
from allocator.session import Session  # noqa: E402
from allocator.spec import RunConfig, resolve  # noqa: E402

LEVELS = {"sparsegpt": "0:0.9:0.05", "wanda": "0:0.9:0.05", "gptq": "dense,w8g128,w6g128,w5g128,w4g128,w3g128,w2g128"}


def methods(args) -> dict[str, tuple[str, dict]]:
    """The columns: the start, today's evolution from it, guided evolution from it (the same generations and
    stages), each with the fitted search's GPU amount (a CPU run measures as many plans as a GPU one)."""
    fitted = {"fit_plans": args.fit_plans, "fit_rounds": args.fit_rounds}
    evo = {"start": "knapsack", "generations": args.generations, "offspring": args.offspring, "stages": args.stages}
    guided = {**evo, "explore": args.explore}
    every = {"knapsack": ("knapsack", {}), "evolution": ("evolution", evo), "guided": ("guided", guided)}
    return {label: (method, {**fitted, **options}) for label, (method, options) in every.items()
            if label == "knapsack" or label in args.methods.split(",")}  # fmt: skip


def one_setting(args, backend: str, target: str, seed: int, texts: list[str], out: Path) -> list[dict]:
    config = RunConfig(model=args.model, calib=args.calib, eval=texts[0], backend=backend, levels=LEVELS[backend],
                       target=target, seed=seed, calib_samples=args.calib_samples, eval_samples=args.eval_samples,
                       kl_samples=args.kl_samples, fit_seqs=args.fit_seqs, seq_len=args.seq_len,
                       batch_size=args.batch_size, device=args.device, dtype=args.dtype, sensitivity="fitted",
                       cache_dir=args.cache_dir)  # fmt: skip
    session = Session(config)
    windows = {t: session.eval_seqs if i == 0 else _windows(session, t, config) for i, t in enumerate(texts)}
    rows = []
    for label, (method, options) in methods(args).items():
        cell = out / f"{backend}_{target}_seed{seed}" / label
        fitted = cell.parent / "knapsack" / "fitted_state.json"
        if label != "knapsack" and fitted.is_file():  # the start's fitted plans, resumed: none measured twice
            cell.mkdir(parents=True, exist_ok=True)
            shutil.copy(fitted, cell / "fitted_state.json")
        resume = fitted.is_file()  # a cut-off run measures no plan twice (the start's included)
        spec = resolve(replace(config, method=method, options=options, output_dir=str(cell), resume=resume))
        parents: list[tuple[int, np.ndarray]] = []
        spent = [0]

        def observe(record: dict, parent: np.ndarray, parents=parents, spent=spent) -> None:
            spent[0] += record["tokens"]
            if not parents or not np.array_equal(parents[-1][1], parent):
                parents.append((spent[0], parent.copy()))

        start = time.perf_counter()
        result = run(spec, session, observer=observe)
        elapsed = time.perf_counter() - start
        ppl = _evaluate(session, windows, config.batch_size, 1000)
        curve = held_out_curve(session, spec, parents) if parents else []
        rows.append({"backend": backend, "target": target, "seed": seed, "method": label, "time_s": elapsed,
                     "kl_held_out": result.metrics["kl_to_dense"], "tokens": spent[0], "curve": curve,
                     "timings": result.metrics["timings"],
                     "fit_s": result.metrics.get("sensitivity", {}).get("fit_s"),
                     **{f"ppl:{Path(t).name}": v["perplexity"] for t, v in ppl.items()},
                     **{f"ci:{Path(t).name}": [v["lo"], v["hi"]] for t, v in ppl.items()}})  # fmt: skip
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "curve"}), flush=True)
    return rows


def held_out_curve(session: Session, spec, parents: list[tuple[int, np.ndarray]]) -> list[list[float]]:
    """(tokens spent, KL on the held-out calibration windows) of every parent a search moved to."""
    problem = build_problem(session.inventory, list(spec.grid), spec.budget, spec.config.per)
    db = session.database(list(spec.grid), spec.backend.name)
    fitness = KLFitness(session.model, session.inventory, problem, db, session.kl_seqs, spec.config.batch_size)
    every = np.arange(fitness.pool_size)
    return [[tokens, fitness(choice, every)] for tokens, choice in parents]


def summarise(rows: list[dict], out: Path, command: str) -> None:
    df = pd.DataFrame([{k: v for k, v in r.items() if k not in ("curve", "timings") and not k.startswith("ci:")}
                       for r in rows])  # fmt: skip
    write_text_atomic(out.with_suffix(".csv"), df.to_csv(index=False))
    texts = [c for c in df if c.startswith("ppl:")]
    lines = [f"# Evolution from a strong start (issue 33)\n\n`{command}`\n",
             "Ratios are to the fitted knapsack (the start) of the same setting and seed; KL to dense on the "
             "held-out calibration windows.\n"]  # fmt: skip
    header = "| setting | seed | method | tokens | KL | KL ratio | " + " | ".join(
        f"{t[4:]} ppl | ratio" for t in texts) + " | time s |"  # fmt: skip
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for (backend, target, seed), group in df.groupby(["backend", "target", "seed"], sort=False):
        base = group[group.method == "knapsack"].iloc[0]
        for _, r in group.iterrows():
            cells = " | ".join(f"{r[t]:.2f} | {r[t] / base[t]:.3f}" for t in texts)
            lines.append(f"| {backend} {target} | {seed} | {r.method} | {r.tokens / 1e6:.2f}M | {r.kl_held_out:.4f} | "
                         f"{r.kl_held_out / base.kl_held_out:.3f} | {cells} | {r.time_s:.0f} |")  # fmt: skip
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    plot(rows, out.with_suffix(".png"))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys((r["backend"], r["target"]) for r in rows))
    fig, axes = plt.subplots(1, len(settings), figsize=(5 * len(settings), 4), squeeze=False)
    colors = {"evolution": "tab:orange", "guided": "tab:green"}
    for ax, (backend, target) in zip(axes[0], settings, strict=True):
        for r in rows:
            if (r["backend"], r["target"]) != (backend, target):
                continue
            if r["method"] == "knapsack":
                ax.axhline(r["kl_held_out"], color="gray", ls=":", lw=1)
                continue
            xs, ys = zip(*r["curve"], strict=True) if r["curve"] else ((0,), (r["kl_held_out"],))
            ax.step([x / 1e6 for x in xs] + [r["tokens"] / 1e6], [*ys, ys[-1]], where="post",
                    color=colors.get(r["method"]), label=f"{r['method']} (seed {r['seed']})", alpha=0.8)  # fmt: skip
        ax.set(title=f"{backend} {target}", xlabel="candidate tokens (M)", ylabel="held-out KL to dense")
        ax.legend(fontsize=7)
    fig.suptitle("KL of the parent on held-out windows\n(dotted: the fitted-knapsack start)", fontsize=10)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--settings", default="sparsegpt:sparsity=0.7,gptq:bits=3", help="BACKEND:TARGET, comma-separated")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--model", default=None)
    ap.add_argument("--c4", default=None, help="the C4 validation parquet (default: shared data)")
    ap.add_argument("--wikitext", default=None)
    ap.add_argument("--held-out-docs", type=int, default=400)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--kl-samples", type=int, default=8)
    ap.add_argument("--fit-seqs", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--methods", default="evolution,guided", help="searches from the knapsack start, comma-separated")
    ap.add_argument("--fit-plans", type=int, default=GPU_FIT["fit_plans"])
    ap.add_argument("--fit-rounds", type=int, default=GPU_FIT["fit_rounds"])
    ap.add_argument("--generations", type=int, default=60)
    ap.add_argument("--offspring", type=int, default=16)
    ap.add_argument("--stages", default="4@2048,1@8192", help="both searches' race")
    ap.add_argument("--explore", type=float, default=0.25, help="guided: share of children not screened")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", required=True, help="output path without suffix (.json/.csv/.md/.png)")
    ap.add_argument("--work", default=None, help="run folders (default: OUT_runs beside the output)")
    ap.add_argument("--summarise", action="store_true", help="only write the summary of OUT.json (a cut-off run)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.summarise:
        saved = json.loads(out.with_suffix(".json").read_text())
        summarise(saved["rows"], out, saved["command"])
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(args.work) if args.work else out.parent / (out.name + "_runs")
    work.mkdir(parents=True, exist_ok=True)
    c4 = args.c4 or data.default_calibration()
    args.calib, heldout = split_c4(Path(c4), args.held_out_docs, work)
    texts = [args.wikitext or data.default_evaluation(), heldout]
    command = "python " + shlex.join(sys.argv)
    rows: list[dict] = []
    for setting in args.settings.split(","):
        backend, target = setting.split(":", 1)
        Budget.parse(target), parse_grid(LEVELS[backend])  # bad settings fail before any work
        for seed in map(int, args.seeds.split(",")):
            rows += one_setting(args, backend, target, seed, texts, work)
            write_json_atomic(out.with_suffix(".json"), {"command": command, "rows": rows})
    summarise(rows, out, command)


if __name__ == "__main__":
    main()
