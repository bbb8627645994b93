"""Compare allocation methods at several budgets on the real model, in one run (one session).

    python scripts/compare_methods.py --out results/methods

Sparsity budgets use --sparsity-backend over a fine sparsity grid; bit budgets use --bits-backend over
bit-widths. Every method sees the same profile, data and backend. Writes OUT.csv/.json/.md, a
perplexity plot and a per-layer allocation heatmap.
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
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from allocator.budget import Budget, build_problem  # noqa: E402
from allocator.fitness import KLFitness  # noqa: E402
from allocator.io import write_json_atomic, write_text_atomic  # noqa: E402
from allocator.levels import parse_grid, parse_level  # noqa: E402
from allocator.search import get_searcher  # noqa: E402
from allocator.session import RunConfig, Session  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", default="0.4,0.5,0.6")
    ap.add_argument("--sparsity-backend", default="wanda")
    ap.add_argument("--sparsity-levels", default="0:0.9:0.05")
    ap.add_argument("--sparsity-methods", default="uniform,owl,knapsack")
    ap.add_argument("--bits", default="3.125,3.625,4.125")
    ap.add_argument("--bits-backend", default="rtn")
    ap.add_argument("--bits-levels", default="dense,w8g128,w6g128,w5g128,w4g128,w3g128,w2g128")
    ap.add_argument("--bits-methods", default="uniform,knapsack")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--kl-samples", type=int, default=8)
    ap.add_argument("--evolution-budgets", default="sparsity=0.5,sparsity=0.6", help="budgets where evolution runs")
    ap.add_argument(
        "--apply",
        choices=["database", "sequential"],
        default="database",
        help="database: copy levels from the level database (one dense-input calibration pass); "
        "sequential: re-run the backend block by block for every plan",
    )
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument(
        "--evolution",
        default="generations=12,offspring=8,stages=2@1024;1@4096",
        help="settings of the evolution-uniform / evolution-knapsack methods",
    )
    ap.add_argument("--optuna", default="trials=150,sampler=tpe",
                    help="settings of the optuna-levels / optuna-compact methods")  # fmt: skip
    ap.add_argument("--model", default=None)
    ap.add_argument("--calib", default=None)
    ap.add_argument("--eval", default=None)
    ap.add_argument("--profiles-dir", default="profiles")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--fitness-batch", type=int, default=4, help="sequences per forward in the evolution fitness")
    ap.add_argument("--probe", type=int, default=8, help="evolution: fixed pool sequences to track the parent's KL")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    config = RunConfig(model=args.model, calib=args.calib, eval=args.eval, calib_samples=args.calib_samples,
                       eval_samples=args.eval_samples, kl_samples=args.kl_samples, seq_len=args.seq_len,
                       profiles_dir=args.profiles_dir, device=args.device, dtype=args.dtype)  # fmt: skip
    out = Path(args.out)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    # resumable: rows already in OUT.json are kept and their (budget, method) skipped
    rows = json.loads(out.with_suffix(".json").read_text())["rows"] if out.with_suffix(".json").is_file() else []
    done = {(r["budget"], r["method"]) for r in rows}
    history_csv = out.with_name(out.name + "_history.csv")
    histories = pd.read_csv(history_csv).to_dict("records") if history_csv.is_file() and rows else []
    session = Session(config)
    evo = {k: v.replace(";", ",") for k, v in (item.split("=") for item in args.evolution.split(","))}
    # per-layer levels of every row, kept beside the rows so a resumed run plots all of them
    alloc_json = out.with_name(out.name + "_allocations.json")
    allocations = json.loads(alloc_json.read_text()) if alloc_json.is_file() and rows else {}
    experiments = [("sparsity", v, args.sparsity_backend, args.sparsity_levels, args.sparsity_methods)
                   for v in args.sparsity.split(",")]  # fmt: skip
    experiments += [("bits", v, args.bits_backend, args.bits_levels, args.bits_methods)
                    for v in args.bits.split(",") if v]  # fmt: skip
    for kind, value, backend, levels, methods in experiments:
        grid = parse_grid(levels)
        budget = Budget(kind, float(value)).checked()
        profile = session.profile(grid, backend, with_database=args.apply == "database")
        problem = build_problem(session.inventory, grid, budget)
        problem.error = profile.error_matrix(problem.units, grid)
        problem.info["outlier_ratio"] = profile.outlier_ratio(problem.units)
        database = session.database(grid, backend) if args.apply == "database" else None
        for method in methods.split(","):
            counters: dict = {}
            searches_model = method.startswith(("evolution", "optuna"))
            if searches_model and str(budget) not in args.evolution_budgets.split(","):
                continue
            if (str(budget), method) in done:
                continue
            if searches_model:
                db = database or session.database(grid, backend)
                problem.fitness = KLFitness(session.model, session.inventory, problem, db, session.calib,
                                            batch_size=args.fitness_batch)  # fmt: skip
            if method.startswith("evolution"):
                searcher = get_searcher("evolution", start=method.split("-")[1], probe=args.probe,
                                        generations=int(evo["generations"]), offspring=int(evo["offspring"]),
                                        stages=evo["stages"])  # fmt: skip
            elif method.startswith("optuna"):
                opt = dict(item.split("=") for item in args.optuna.split(","))
                searcher = get_searcher("optuna", space=method.split("-")[1], trials=int(opt["trials"]),
                                        sampler=opt.get("sampler", "tpe"), probe=args.probe)  # fmt: skip
            else:
                searcher = get_searcher(method)
            t0 = time.perf_counter()
            choice = searcher.search(problem, seed=0)
            search_s = time.perf_counter() - t0
            if method.startswith("optuna"):
                counters = {"evaluations": len(searcher.history),
                            "search_tokens": len(searcher.history) * args.probe * args.seq_len}  # fmt: skip
                histories += [{"budget": str(budget), "method": method, "generation": h["trial"],
                               "fitness": h["fitness"], "parent_kl": None,
                               "tokens": args.probe * args.seq_len} for h in searcher.history]  # fmt: skip
            if method.startswith("evolution"):
                counters = {"search_tokens": sum(h["tokens"] for h in searcher.history),
                            "evaluations": sum(h.get("evaluations", 0) for h in searcher.history),
                            "block_forwards_saved": problem.fitness.counters["block_forwards_saved"]
                            / max(1, problem.fitness.counters["block_forwards"]),
                            "generations": len([h for h in searcher.history if h["generation"] > 0])}  # fmt: skip
                histories += [{"budget": str(budget), "method": method, **h} for h in searcher.history]
            assignment = problem.assignment(choice)
            m = session.evaluate(assignment, backend, database)
            rows.append({"budget": str(budget), "kind": kind, "method": method, "backend": backend,
                         "achieved_sparsity": m["achieved"]["sparsity"], "achieved_bits": m["achieved"]["bits"],
                         "proxy_error": float(problem.error[np.arange(len(choice)), choice].sum()),
                         "dense_ppl": m["dense_perplexity"], "ppl": m["perplexity"], "kl": m["kl_to_dense"],
                         "search_s": search_s, "apply": args.apply, "eval_tokens": m["eval_tokens"], **counters,
                         "calibration_tokens": m["calibration_tokens"]})  # fmt: skip
            allocations[f"{budget} {method}"] = [assignment[lay.name].name for lay in session.inventory.layers]
            print(rows[-1], flush=True)
            write_outputs(rows, out, command, session.inventory, allocations, histories)


def write_outputs(rows: list[dict], out: Path, command: str, inventory, allocations: dict,
                  histories: list[dict]) -> None:  # fmt: skip
    """Tables and plots of the rows so far; called after every row so a stopped run keeps its results."""
    if histories:
        hist = pd.DataFrame(histories)
        write_text_atomic(out.with_name(out.name + "_history.csv"), hist.to_csv(index=False))
        plot_convergence(hist, out.with_name(out.name + "_convergence.png"))
    df = pd.DataFrame(rows)
    write_text_atomic(out.with_suffix(".csv"), df.to_csv(index=False))
    write_json_atomic(out.with_suffix(".json"), {"command": command, "rows": rows})
    table = df.pivot_table(index="budget", columns="method", values="ppl", sort=False)
    write_text_atomic(
        out.with_suffix(".md"), f"`{command}`\n\nWikiText-2 test perplexity\n\n{table.round(2).to_markdown()}\n"
    )
    plot_ppl(df, out.with_name(out.name + "_ppl.png"))
    if allocations:
        write_json_atomic(out.with_name(out.name + "_allocations.json"), allocations)
        plot_allocation(inventory, allocations, out.with_name(out.name + "_allocation.png"))


def plot_convergence(hist: pd.DataFrame, path: Path) -> None:
    """Per budget: the parent's KL on the fixed probe sequences against calibration tokens spent, per start."""
    budgets = list(dict.fromkeys(hist["budget"]))
    fig, axes = plt.subplots(1, len(budgets), figsize=(4.5 * len(budgets), 3.8), squeeze=False)
    for ax, budget in zip(axes[0], budgets, strict=True):
        for method, g in hist[hist.budget == budget].groupby("method"):
            # evolution: its parent on the probe rows; optuna: best trial so far, scored on the same rows
            y = g["parent_kl"] if "parent_kl" in g and g["parent_kl"].notna().any() else g["fitness"].cummin()
            ax.plot(g["tokens"].cumsum() / 1e6, y, label=method)
        ax.set(xlabel="calibration tokens evaluated (M)", ylabel="best KL to dense (fixed probe rows)", title=budget)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_ppl(df: pd.DataFrame, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (kind, x) in zip(axes, (("sparsity", "achieved_sparsity"), ("bits", "achieved_bits")), strict=True):
        for method, g in df[df.kind == kind].groupby("method"):
            ax.plot(g[x], g["ppl"], marker="o", label=method)
        ax.axhline(df["dense_ppl"].iloc[0], color="gray", ls="--", label="dense")
        ax.set(xlabel=x.replace("_", " "), ylabel="WikiText-2 perplexity", yscale="log", title=f"{kind} budgets")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_allocation(inventory, allocations: dict, path: Path) -> None:
    """Heatmap per method: decoder block x layer role, colour = sparsity (or bits)."""
    roles = list(dict.fromkeys(lay.role for lay in inventory.layers))
    chosen = [k for k in allocations if not k.endswith(" uniform")]
    if not chosen:
        return
    fig, axes = plt.subplots(1, len(chosen), figsize=(2.2 * len(chosen) + 1, 6), squeeze=False)
    for ax, key in zip(axes[0], chosen, strict=True):
        grid = np.full((inventory.n_blocks, len(roles)), np.nan)
        bits = key.startswith("bits")
        for lay, name in zip(inventory.layers, allocations[key], strict=True):
            lv = parse_level(name)
            grid[lay.block, roles.index(lay.role)] = lv.bits if bits else lv.sparsity
        im = ax.imshow(grid, aspect="auto", cmap="viridis_r" if not bits else "viridis")
        budget, method = key.split(" ", 1)
        ax.set_title(f"{method}\n{budget}", fontsize=8)
        ax.set_xticks(
            range(len(roles)), [r.split(".")[-1].replace("_proj", "") for r in roles], fontsize=7, rotation=90
        )
        ax.set_ylabel("block")
        fig.colorbar(im, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
