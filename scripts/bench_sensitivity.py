"""Which sensitivity predicts the real model's KL, and do the cheap allocators now beat uniform?

    python scripts/bench_sensitivity.py --backend wanda --levels 0:0.9:0.1 --budgets sparsity=0.5,sparsity=0.6 \
        --device cuda --out results/sensitivity_wanda

For one backend and grid, on the real model (default SmolLM2-135M), with the C4 sample split by document
into a calibration part and a held-out part never used for calibration:
1. profile (relative error + Fisher), level database, per-layer KL column: each timed;
2. ``--plans`` random feasible plans at ``--spearman-budget``: their measured KL against each sensitivity's
   prediction (Spearman; for ``fitted`` the k-fold held-out prediction);
3. per budget and calibration seed: uniform, OWL (sparsity budgets), knapsack with each sensitivity and
   (``--optuna-trials``) optuna's compact space; every
   plan's perplexity on WikiText-2 and on held-out C4 documents, and its KL to dense.
Writes OUT.json/.csv/.md and OUT.png; rows already in OUT.json are kept (resumable).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from allocator import data  # noqa: E402
from allocator.budget import Budget, build_problem  # noqa: E402
from allocator.evaluate import perplexity  # noqa: E402
from allocator.fitness import KLFitness  # noqa: E402
from allocator.io import write_json_atomic, write_text_atomic  # noqa: E402
from allocator.levels import parse_grid  # noqa: E402
from allocator.pipeline import prepare  # noqa: E402
from allocator.search import SearchContext, allocate, make_searcher  # noqa: E402
from allocator.search.additive import fit  # noqa: E402
from allocator.search.fitted import random_plans  # noqa: E402
from allocator.session import Session  # noqa: E402
from allocator.spec import RunConfig, resolve  # noqa: E402

KINDS = ("error", "fisher", "kl", "fitted")


def split_c4(parquet: Path, held_out: int, folder: Path) -> tuple[str, str]:
    """The C4 sample as a calibration parquet (all but the last ``held_out`` documents) and a held-out text."""
    df = pd.read_parquet(parquet)
    calib, rest = folder / "c4-calib.parquet", folder / "c4-heldout.txt"
    df.iloc[:-held_out][["text"]].to_parquet(calib)
    rest.write_text("\n".join(t.replace("\n", " ") for t in df.iloc[-held_out:]["text"]) + "\n")
    return str(calib), str(rest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="wanda")
    ap.add_argument("--levels", default="0:0.9:0.1")
    ap.add_argument("--budgets", default="sparsity=0.5,sparsity=0.6,sparsity=0.7")
    ap.add_argument("--spearman-budget", default=None, help="budget of the random plans (default: the second)")
    ap.add_argument("--plans", type=int, default=64)
    ap.add_argument("--seeds", default="0", help="calibration seeds of the cheap methods")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--model", default=None)
    ap.add_argument("--c4", default=None, help="the C4 validation parquet (default: shared data)")
    ap.add_argument("--wikitext", default=None)
    ap.add_argument("--held-out-docs", type=int, default=400)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--fit-seqs", type=int, default=8)
    ap.add_argument("--fit-plans", type=int, default=64)
    ap.add_argument("--fit-rounds", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--evolution",
        default="",
        help="e.g. sparsity=0.7@40: evolution from each knapsack start, "
        "that budget, that many generations (16 offspring, 1@4096), parent KL on 8 fixed sequences",
    )
    ap.add_argument("--evolution-starts", default="error,fisher")
    ap.add_argument("--optuna-trials", type=int, default=0, help="> 0: add optuna's compact space (that many trials, "
                    "TPE, on 8 fixed windows) re-weighting the default sensitivity")  # fmt: skip
    ap.add_argument("--timing-only", action="store_true", help="time profile, database, kl, fitted (first budget) "
                    "and one backend pass, then stop (for CPU timings)")  # fmt: skip
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    state = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").is_file() else {}
    rows, spearman, timings = state.get("rows", []), state.get("spearman", []), state.get("timings", [])
    done = {(r["seed"], r["budget"], r["method"]) for r in rows}
    tmp = Path(tempfile.mkdtemp(prefix="bench-sensitivity-"))
    calib, held_out = split_c4(Path(args.c4 or data.default_calibration()), args.held_out_docs, tmp)
    grid, kinds = parse_grid(args.levels), args.kinds.split(",")
    budgets = [Budget.parse(b) for b in args.budgets.split(",")]
    optuna = ["optuna-compact"] if args.optuna_trials else []
    methods_of = {str(b): ["uniform", *(["owl"] if b.kind == "sparsity" else []), *(f"knapsack-{k}" for k in kinds),
                           *optuna] for b in budgets}  # fmt: skip
    first = int(args.seeds.split(",")[0])
    for seed in (int(s) for s in args.seeds.split(",")):
        todo = [(b, m) for b, ms in methods_of.items() for m in ms if (seed, b, m) not in done]
        if not todo and (seed != first or any("measured" in s for s in spearman)):
            continue  # every row of this seed is in OUT.json already
        config = RunConfig(model=args.model, calib=calib, eval=args.wikitext, calib_samples=args.calib_samples,
                           eval_samples=args.eval_samples, kl_samples=8, batch_size=args.batch_size, seed=seed,
                           device=args.device, fit_seqs=args.fit_seqs, levels=args.levels,
                           options={"fit_plans": args.fit_plans, "fit_rounds": args.fit_rounds},
                           cache_dir=args.cache_dir or str(tmp / "profiles"))  # fmt: skip
        session = Session(config)
        c4_seqs = data.evaluation_sequences(session.loaded.tokenizer, data.load_records(held_out), 512,
                                            args.eval_samples, session.bos)  # fmt: skip
        timing = {"seed": seed, "backend": args.backend, "levels": args.levels, "device": args.device}
        t0 = time.perf_counter()
        profile = session.profile(grid, args.backend, with_database=True)
        timing["profile_s"] = time.perf_counter() - t0  # relative error, Fisher and the level database in one pass
        t0 = time.perf_counter()
        db = session.database(grid, args.backend)
        timing["database_s"] = time.perf_counter() - t0
        if "kl" in kinds and "kl" not in profile.table:
            session.add_kl(profile, grid, args.backend)
            timing["kl_s"] = profile.meta["kl_s"]
        if seed == first:
            timing.update(backend_pass(session, grid, budgets[0], args.backend))
        if args.timing_only:
            t0 = time.perf_counter()
            sensitivity_matrix(session, build_problem(session.inventory, grid, budgets[0]), args.backend,
                               "fitted")  # fmt: skip
            timing["fitted_s"] = time.perf_counter() - t0
        timings.append(timing)
        print(timing, flush=True)
        if args.timing_only:
            write_outputs(out, command, rows, spearman, timings)
            continue
        if seed == first:
            profile.save(out.with_name(out.name + "_profile.parquet"))
            if not any("measured" in s for s in spearman):
                spearman = rank_correlations(session, profile, db, grid, kinds, args)
                print([{k: v for k, v in s.items() if k not in ("plans_levels", "measured")} for s in spearman])
        for budget in budgets:
            problem = build_problem(session.inventory, grid, budget)
            outliers = profile.outlier_ratio(problem.units)
            matrices: dict[str, tuple] = {}  # per sensitivity: the fitted one is measured once per budget
            for method in methods_of[str(budget)]:
                if (seed, str(budget), method) in done:
                    continue
                t0 = time.perf_counter()
                # optuna's compact space re-weights the default sensitivity (fitted, listed last)
                kind = method.split("-")[1] if method.startswith("knapsack") else kinds[-1]
                if method.startswith(("knapsack", "optuna")) and kind not in matrices:
                    matrices[kind] = sensitivity_matrix(session, problem, args.backend, kind)
                if method.startswith("knapsack"):
                    error, record = matrices[kind]
                    knapsack = make_searcher("knapsack")
                    choice = allocate(problem.with_sensitivity(error), knapsack, SearchContext(seed)).choice
                elif method == "optuna-compact":
                    error, record = matrices[kind]
                    tuned = problem.with_sensitivity(error, outliers)
                    fitness = KLFitness(session.model, session.inventory, tuned, db, session.calib, args.batch_size)
                    searcher = make_searcher("optuna", space="compact", sampler="tpe", trials=args.optuna_trials,
                                             probe=8)  # fmt: skip
                    choice = allocate(tuned, searcher, SearchContext(seed, fitness)).choice
                else:
                    profiled = problem.with_sensitivity(np.zeros(problem.cost.shape), outliers)  # OWL reads the ratios
                    record, choice = {}, allocate(profiled, make_searcher(method), SearchContext(seed)).choice
                search_s = time.perf_counter() - t0
                m = session.evaluate(problem.assignment(choice), args.backend, db)
                c4 = perplexity(session.model, c4_seqs, args.batch_size, desc="held-out C4")
                rows.append({"seed": seed, "budget": str(budget), "method": method, "backend": args.backend,
                             "wikitext_ppl": m["perplexity"], "c4_heldout_ppl": c4, "kl": m["kl_to_dense"],
                             "dense_wikitext_ppl": m["dense_perplexity"], "sparsity": m["achieved"]["sparsity"],
                             "bits": m["achieved"]["bits"], "search_s": search_s,
                             "fit_spearman": record.get("held_out", {}).get("spearman"),
                             "levels": [problem.levels[k].name for k in choice]})  # fmt: skip
                print({k: v for k, v in rows[-1].items() if k != "levels"}, flush=True)
                write_outputs(out, command, rows, spearman, timings)
        key = (seed, str(budgets[0]), "knapsack-fitted")
        fitted = [r["search_s"] for r in rows if (r["seed"], r["budget"], r["method"]) == key]
        if fitted and "fitted_s" not in timing:
            timing["fitted_s"] = fitted[0]  # the knapsack's search time: the fit (measured plans) dominates it
            write_outputs(out, command, rows, spearman, timings)
        if args.evolution and seed == first:
            evolve(session, profile, db, grid, args, out)
    write_outputs(out, command, rows, spearman, timings)


def sensitivity_matrix(session: Session, problem, backend: str, kind: str) -> tuple[np.ndarray, dict]:
    """The [U, K] sensitivity ``kind`` of ``problem``, made as a knapsack run makes it (from the session's cached
    profile; the fitted one measures plans on the model)."""
    config = replace(session.config, method="knapsack", sensitivity=kind, backend=backend,
                     target=str(problem.budget), output_dir=None)  # fmt: skip
    found, _, _, record = prepare(resolve(config), session, problem)
    return found.sensitivity, record or {}


def backend_pass(session, grid, budget: Budget, backend: str) -> dict:
    """Seconds of one ordinary compression pass (the backend run block by block at the uniform plan)."""
    from allocator.backends import apply_

    problem = build_problem(session.inventory, grid, budget)
    assignment = allocate(problem, make_searcher("uniform")).assignment
    session.restore_()
    t0 = time.perf_counter()
    apply_(session.model, assignment, backend, session.calib, session.config.batch_size)
    seconds = time.perf_counter() - t0
    session.restore_()
    return {"backend_pass_s": seconds, "backend_pass_budget": str(budget)}


def evolve(session, profile, db, grid, args, out: Path) -> None:
    """Evolution from the knapsack plan of each sensitivity at equal tokens: the parent's KL on fixed sequences."""
    text, generations = args.evolution.split("@")
    budget = Budget.parse(text)
    curves = out.with_name(out.name + "_evolution.csv")
    old = pd.read_csv(curves) if curves.is_file() else pd.DataFrame(columns=["start"])
    frames = [old]
    for kind in args.evolution_starts.split(","):
        if kind in set(old["start"]):
            continue
        problem = build_problem(session.inventory, grid, budget)
        error, _ = sensitivity_matrix(session, problem, args.backend, kind)
        problem = problem.with_sensitivity(error)
        fitness = KLFitness(session.model, session.inventory, problem, db, session.calib, args.batch_size)
        searcher = make_searcher("evolution", start="knapsack", generations=int(generations), offspring=16,
                                 stages="1@4096", probe=8)  # fmt: skip
        t0 = time.perf_counter()
        found = allocate(problem, searcher, SearchContext(0, fitness))
        m = session.evaluate(found.assignment, args.backend, db)
        hist = pd.DataFrame(found.history)
        hist["tokens"] = hist["tokens"].cumsum()
        hist["start"], hist["budget"], hist["final_wikitext_ppl"] = kind, str(budget), m["perplexity"]
        hist["search_s"] = time.perf_counter() - t0
        frames.append(hist)
        print({"evolution_start": kind, "final_wikitext_ppl": m["perplexity"], "parent_kl": hist["parent_kl"].iloc[-1]},
              flush=True)  # fmt: skip
        all_curves = pd.concat([f for f in frames if len(f)], ignore_index=True)
        write_text_atomic(curves, all_curves.to_csv(index=False))
        fig, ax = plt.subplots(figsize=(6.5, 4.5))
        for start, g in all_curves.groupby("start", sort=False):
            ax.plot(g["tokens"] / 1e6, g["parent_kl"], marker=".", label=f"knapsack-{start} start")
        ax.set_xlabel("candidate tokens (M)")
        ax.set_ylabel("parent KL on 8 fixed sequences")
        ax.set_title(f"evolution at {budget} ({args.backend})")
        ax.legend()
        fig.tight_layout()
        tmp = curves.with_name(f".{curves.stem}.png.tmp")
        fig.savefig(tmp, format="png", dpi=110)
        tmp.replace(curves.with_suffix(".png"))
        plt.close(fig)


def rank_correlations(session, profile, db, grid, kinds, args) -> list[dict]:
    """Spearman of each sensitivity's summed prediction against the measured KL of random feasible plans."""
    budget = Budget.parse(args.spearman_budget or args.budgets.split(",")[min(1, len(args.budgets.split(",")) - 1)])
    problem = build_problem(session.inventory, grid, budget)
    start = allocate(problem, make_searcher("uniform")).choice
    plans = random_plans(problem, start, args.plans, seed=0)
    seqs = session.kl_seqs  # windows no sensitivity was measured on
    fitness = KLFitness(session.model, session.inventory, problem, db, seqs, args.batch_size)
    fitness.set_parent(start)
    t0 = time.perf_counter()
    measured = np.array([fitness(p, np.arange(len(seqs))) for p in plans])
    out = []
    rows = np.arange(len(problem.units))
    for kind in [k for k in kinds if k != "fitted"]:
        matrix = profile.error_matrix(problem.units, grid, kind)
        predicted = matrix[rows, plans].sum(1)
        out.append({"sensitivity": kind, "spearman": float(spearmanr(predicted, measured).statistic),
                    "budget": str(budget), "plans": len(plans)})  # fmt: skip
    for prior in [k for k in ("fisher", "kl") if "fitted" in kinds and k in kinds]:
        model = fit(profile.error_matrix(problem.units, grid, prior), plans, measured)
        out.append({"sensitivity": f"fitted ({prior} prior)", "spearman": model.held_out["spearman"],
                    "r2": model.held_out["r2"], "budget": str(budget), "plans": len(plans),
                    "note": "5-fold held-out"})  # fmt: skip
    out.append({"sensitivity": "measured_kl_range", "min": float(measured.min()), "max": float(measured.max()),
                "measure_s": time.perf_counter() - t0, "measured": measured.tolist(),
                "plans_levels": plans.tolist()})  # fmt: skip
    return out


def write_outputs(out: Path, command: str, rows: list[dict], spearman: list[dict], timings: list[dict]) -> None:
    """JSON (resume state), CSV, a Markdown table (mean ± spread over seeds) and a plot, after every row."""
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out.with_suffix(".json"), {"command": command, "rows": rows, "spearman": spearman,
                                                 "timings": timings})  # fmt: skip
    if not rows:
        return
    df = pd.DataFrame(rows)
    write_text_atomic(out.with_suffix(".csv"), df.drop(columns="levels").to_csv(index=False))
    agg = df.groupby(["budget", "method"], sort=False).agg(
        wikitext=("wikitext_ppl", "mean"), wikitext_sd=("wikitext_ppl", "std"), c4=("c4_heldout_ppl", "mean"),
        c4_sd=("c4_heldout_ppl", "std"), kl=("kl", "mean"), seeds=("seed", "nunique"))  # fmt: skip
    lines = [f"# Sensitivities: {df['backend'].iloc[0]}", "", f"`{command}`", "",
             "| budget | method | WikiText-2 ppl | held-out C4 ppl | KL | seeds |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for (budget, method), r in agg.iterrows():
        sd = lambda v: "" if not np.isfinite(v) else f" ± {v:.1f}"  # noqa: E731
        lines.append(f"| {budget} | {method} | {r.wikitext:.2f}{sd(r.wikitext_sd)} | {r.c4:.2f}{sd(r.c4_sd)} | "
                     f"{r.kl:.4f} | {r.seeds} |")  # fmt: skip
    if spearman:
        lines += ["", "| sensitivity | Spearman vs measured KL |", "|---|---|"]
        lines += [f"| {s['sensitivity']} | {s['spearman']:.3f} |" for s in spearman if "spearman" in s]
    if timings:
        nan = float("nan")
        lines += ["", "| device | seed | profile + database s (error, fisher, levels) | kl column s | fitted s "
                  "(one budget) | one backend pass s |", "|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {t['device']} | {t['seed']} | {t['profile_s'] + t['database_s']:.1f} | "
                  f"{t.get('kl_s', nan):.1f} | {t.get('fitted_s', nan):.1f} | {t.get('backend_pass_s', nan):.1f} |"
                  for t in timings]  # fmt: skip
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, col in zip(axes, ("wikitext", "c4"), strict=True):
        for method, g in agg.reset_index().groupby("method", sort=False):
            ax.errorbar(g["budget"], g[col], yerr=g[f"{col}_sd"].fillna(0), marker="o", capsize=3, label=method)
        ax.set_yscale("log")
        ax.set_title(f"{'WikiText-2' if col == 'wikitext' else 'held-out C4'} perplexity ({df['backend'].iloc[0]})")
        ax.set_xlabel("budget")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.png.tmp")
    fig.savefig(tmp, format="png", dpi=110)
    tmp.replace(out.with_suffix(".png"))
    plt.close(fig)


if __name__ == "__main__":
    main()
