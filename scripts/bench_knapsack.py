"""Knapsack solve time on a Llama-3-8B-sized instance: 224 layers (32 blocks x 7) x 20 levels.

Costs are the real kept-parameter counts of Llama-3-8B's shapes at 20 sparsity levels; errors are
synthetic (convex in sparsity, a random sensitivity per layer). Exact MILP (HiGHS) and the DP
frontier (20 budgets in one pass) are timed side by side, with uniform as the baseline.

    python scripts/bench_knapsack.py --out results/bench_knapsack
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from allocator.budget import Budget, Problem
from allocator.io import write_json_atomic
from allocator.levels import parse_grid
from allocator.search import allocate, make_searcher
from allocator.search.knapsack import frontier

SHAPES = {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
          "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}  # fmt: skip


def instance(seed: int = 0) -> Problem:
    grid = parse_grid("0:0.95:0.05")  # 20 levels
    shapes = [SHAPES[r] for _ in range(32) for r in SHAPES]
    cost = np.array([[lv.kept_params(*s) for lv in grid] for s in shapes], dtype=float)
    params = int(sum(r * c for r, c in shapes))
    rng = np.random.default_rng(seed)
    sens = rng.lognormal(0, 1, size=(len(shapes), 1))
    s = np.array([lv.sparsity for lv in grid])[None, :]
    error = sens * (s**2 + 0.5 * s**4) + 1e-4 * rng.random((len(shapes), len(grid)))
    budget = Budget.parse("sparsity=0.5")
    units = [(f"model.layers.{i // 7}.{i % 7}",) for i in range(len(shapes))]
    return Problem(units, grid, cost, budget.value * params, sensitivity=error, budget=budget, params=params)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    problem = instance()
    rows = np.arange(len(problem.units))
    result: dict = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
                    "layers": len(problem.units), "levels": len(problem.levels)}  # fmt: skip
    for name in ("uniform", "knapsack"):
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            choice = allocate(problem, make_searcher(name)).choice
            times.append(time.perf_counter() - t0)
        error = float(problem.sensitivity[rows, choice].sum())
        result[name] = {"median_s": float(np.median(times)), "max_s": float(max(times)),
                        "error": error, "feasible": problem.feasible(choice)}  # fmt: skip
    limits = list(np.linspace(0.2, 0.8, 20) * problem.params)
    t0 = time.perf_counter()
    points = frontier(problem, limits)
    result["frontier_20_budgets"] = {"s": time.perf_counter() - t0, "errors": [p.error for p in points]}
    write_json_atomic(Path(args.out).with_suffix(".json"), result)
    print(json.dumps({k: v for k, v in result.items() if k != "frontier_20_budgets"}, indent=2))
    print("frontier (20 budgets, one DP):", round(result["frontier_20_budgets"]["s"], 3), "s")


if __name__ == "__main__":
    main()
