"""Evolution speed against the forward-pass limit, measured side by side in one run.

The limit is a plain forward of the same model on the same device, dtype and batch shape (tokens/s).
The search runs twice with the same seed: the fast path (level database resident on the device, prefix
cache, one host sync per set of candidates) and the reference path (every candidate runs every block);
both must end with the same plan (one untimed warm-up generation runs first). Candidate tokens count
every token a candidate is scored on, so the prefix cache can lift the rate above the limit.

GPU, Llama-3-8B-shaped random blocks (device tool):
    python scripts/bench_evolution.py --synthetic llama3-8b --blocks 8 --device cuda --dtype bfloat16 \\
        --seq-len 1024 --pool 16 --batch-size 2 --out $OUT/bench_evolution_gpu
GPU, the real model:  python scripts/bench_evolution.py --model M.gguf --calib C4.parquet --device cuda \\
        --dtype bfloat16 --seq-len 2048 --pool 32 --batch-size 8 --out $OUT/bench_evolution_smollm2_gpu
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
from allocator.inventory import Inventory
from allocator.io import write_json_atomic
from allocator.levels import parse_grid
from allocator.model import load_model
from allocator.search import SearchContext, allocate, make_searcher


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def forward_rate(model: torch.nn.Module, pool: torch.Tensor, batch_size: int, device: str, repeats: int = 3) -> float:
    """Tokens/s of plain forwards of the pool (logits included), after one warm-up batch."""
    pool = pool.to(device)
    model(pool[:batch_size], use_cache=False)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        for i in range(0, len(pool), batch_size):
            model(pool[i : i + batch_size], use_cache=False)
    _sync(device)
    return repeats * pool.numel() / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", default=None)
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--model", default=None, help="model id, folder or .gguf (default: the embedded one)")
    ap.add_argument("--calib", default=None, help="calibration text (default: the C4 sample)")
    ap.add_argument("--backend", default="magnitude")
    ap.add_argument("--levels", default="dense,s0.25,s0.5,s0.75")
    ap.add_argument("--target", default="sparsity=0.5")
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--offspring", type=int, default=8)
    ap.add_argument("--stages", default="2@1024,1@4096")
    ap.add_argument("--pool", type=int, default=8, help="calibration sequences in the fitness pool")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=1)
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
        name = args.synthetic
    else:
        loaded = load_model(args.model, dtype=dtype, device=args.device)
        model, name = loaded.model, loaded.model_id
        records = data.load_records(args.calib or data.default_calibration())
        pool = data.calibration_sequences(
            loaded.tokenizer, records, args.seq_len, args.pool, seed=0, bos=data.bos_token_id(loaded.tokenizer)
        )
    inventory = Inventory.from_model(model)
    grid = parse_grid(args.levels)
    problem = build_problem(inventory, grid, Budget.parse(args.target))
    result: dict = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": name,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "dtype": args.dtype,
        "blocks": inventory.n_blocks,
        "layers": len(inventory.layers),
        "pool_tokens": int(pool.numel()),
        "batch": [args.batch_size, args.seq_len],
    }
    with tempfile.TemporaryDirectory(dir=args.db_dir) as tmp:
        t0 = time.perf_counter()
        db = LevelDatabase.build(model, inventory, grid, args.backend, Path(tmp) / "db", pool[:4], batch_size=2)
        _sync(args.device)
        result["database"] = {"build_s": time.perf_counter() - t0, "bytes": db.manifest["bytes"],
                              "full_copy_bytes": db.manifest["full_copy_bytes"]}  # fmt: skip
        result["forward_tokens_per_s"] = forward_rate(model, pool, args.batch_size, args.device)
        # untimed warm-up on the fast path: one-time costs (kernel compilation, allocator growth) excluded
        warm = KLFitness(model, inventory, problem, db, pool, batch_size=args.batch_size)
        settings = {"offspring": args.offspring, "stages": args.stages}
        allocate(problem, make_searcher("evolution", generations=1, **settings), SearchContext(1, warm))
        del warm
        for path, incremental in (("fast", True), ("reference", False)):
            fitness = KLFitness(
                model, inventory, problem, db, pool, batch_size=args.batch_size, incremental=incremental
            )
            evolution = make_searcher("evolution", generations=args.generations, **settings)
            _sync(args.device)
            t0 = time.perf_counter()
            evo = allocate(problem, evolution, SearchContext(0, fitness))
            _sync(args.device)
            seconds = time.perf_counter() - t0
            tokens = sum(h["tokens"] for h in evo.history)
            c = fitness.counters
            result[path] = {
                "search_s": seconds,
                "candidate_tokens": tokens,
                "candidate_tokens_per_s": tokens / seconds,
                "fraction_of_forward_limit": tokens / seconds / result["forward_tokens_per_s"],
                "block_forwards_per_generation": (c["block_forwards"] - c["block_forwards_saved"]) / args.generations,
                "block_forwards_saved_fraction": c["block_forwards_saved"] / max(1, c["block_forwards"]),
                "plan": [grid[k].name for k in evo.choice],
                "final_fitness": evo.history[-1]["fitness"],
            }
            del fitness
    result["same_plan"] = result["fast"]["plan"] == result["reference"]["plan"]
    write_json_atomic(Path(args.out).with_suffix(".json"), result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("fast", "reference")}, indent=2))
    for path in ("fast", "reference"):
        print(path, {k: v for k, v in result[path].items() if k != "plan"})


if __name__ == "__main__":
    main()
