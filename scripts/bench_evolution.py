"""Evolution speed: block-forwards per generation with and without the incremental cache, and the
candidate-evaluation throughput as a fraction of the dense forward-pass limit measured in the same run.

GPU, Llama-3-8B-shaped random blocks (device tool):
    python scripts/bench_evolution.py --synthetic llama3-8b --blocks 8 --device cuda --dtype bfloat16 \
        --seq-len 1024 --pool 8 --out $OUT/bench_evolution_gpu
CPU, the real model:  python scripts/bench_evolution.py --out results/bench_evolution_cpu
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from allocator import data
from allocator.backends.database import LevelDatabase
from allocator.budget import Budget, build_problem
from allocator.fitness import KLFitness
from allocator.io import write_json_atomic
from allocator.levels import parse_grid
from allocator.model import Inventory, load_model
from allocator.search import get_searcher


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", default=None)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--levels", default="dense,s0.25,s0.5,s0.75")
    ap.add_argument("--target", default="sparsity=0.5")
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--stages", default="2@1024,1@4096")
    ap.add_argument("--pool", type=int, default=8, help="calibration sequences in the fitness pool")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--db-dir", default=None)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.synthetic:
        from bench_database import synthetic  # scripts/ is on sys.path when run as a script

        model = synthetic(args.synthetic, args.blocks, dtype, args.device)
        pool = torch.randint(
            model.config.vocab_size, (args.pool, args.seq_len), generator=torch.Generator().manual_seed(0)
        )
    else:
        loaded = load_model(None, dtype=dtype, device=args.device)
        model = loaded.model
        records = data.load_records(data.default_calibration())
        pool = data.calibration_sequences(loaded.tokenizer, records, args.seq_len, args.pool, seed=0)
    inventory = Inventory.from_model(model)
    grid = parse_grid(args.levels)
    problem = build_problem(inventory, grid, Budget.parse(args.target))
    result: dict = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": args.synthetic or "smollm2-135m",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "blocks": inventory.n_blocks,
        "layers": len(inventory.layers),
        "pool_tokens": int(pool.numel()),
    }
    with tempfile.TemporaryDirectory(dir=args.db_dir) as tmp:
        t0 = time.perf_counter()
        db = LevelDatabase.build(model, inventory, grid, "magnitude", Path(tmp) / "db", pool[:2], batch_size=2)
        result["database_build_s"] = time.perf_counter() - t0
        # the forward-pass limit: dense full-model forwards of the pool, tokens per second
        with torch.no_grad():
            model(pool[:1].to(args.device))
            _sync(args.device)
            t0 = time.perf_counter()
            for i in range(len(pool)):
                model(pool[i : i + 1].to(args.device))
            _sync(args.device)
        result["forward_tokens_per_s"] = pool.numel() / (time.perf_counter() - t0)
        for incremental in (True, False):
            fitness = KLFitness(model, inventory, problem, db, pool, batch_size=1, incremental=incremental)
            problem.fitness = fitness
            evo = get_searcher("evolution", generations=args.generations, offspring=args.offspring, stages=args.stages)
            _sync(args.device)
            t0 = time.perf_counter()
            choice = evo.search(problem, seed=0)
            _sync(args.device)
            seconds = time.perf_counter() - t0
            tokens = sum(h["tokens"] for h in evo.history)
            c = fitness.counters
            result["incremental" if incremental else "full"] = {
                "search_s": seconds,
                "candidate_tokens": tokens,
                "candidate_tokens_per_s": tokens / seconds,
                "fraction_of_forward_limit": tokens / seconds / result["forward_tokens_per_s"],
                "block_forwards_per_generation": (c["block_forwards"] - c["block_forwards_saved"]) / args.generations,
                "block_forwards_saved_fraction": c["block_forwards_saved"] / max(1, c["block_forwards"]),
                "final_plan": [grid[k].name for k in choice][:14],
                "final_fitness": evo.history[-1]["fitness"],
            }
    same = result["incremental"]["final_plan"] == result["full"]["final_plan"]
    result["same_plan_with_and_without_cache"] = same
    write_json_atomic(Path(args.out).with_suffix(".json"), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
