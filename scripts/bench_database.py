"""Time, bytes and peak memory to build a full level database (every layer x every level).

Bytes are compared with a full copy per (layer, level) (database format 1, EvoPress's), from the same
build. ``--with-profile`` builds the sensitivity profile in the same calibration pass (as ``run`` does).

CPU, the real model:   python scripts/bench_database.py --out results/bench_database_cpu
GPU, Llama-3-8B-shaped random blocks (device tool):
    python scripts/bench_database.py --synthetic llama3-8b --blocks 2 --device cuda --dtype bfloat16 \
        --calib-samples 32 --seq-len 2048 --out $OUT/bench_database_gpu
The synthetic model has the real block shapes (4096 hidden, 14336 MLP, 32/8 heads) and N of its 32
blocks; the full-model time is extrapolated per block.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from allocator import data
from allocator.backends.database import LevelDatabase
from allocator.backends.db_writer import DatabaseWriter
from allocator.inventory import Inventory
from allocator.io import write_json_atomic
from allocator.levels import parse_grid, with_dense
from allocator.model import load_model
from allocator.profile import Profile

LEVELS = "0:0.9:0.1,2:4,w8,w4g128,w3g128,w2g128"


def synthetic(name: str, blocks: int, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """A random model with the block shapes of ``name`` and ``blocks`` decoder blocks."""
    import transformers

    assert name == "llama3-8b", name
    config = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
        num_hidden_layers=blocks, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
    )  # fmt: skip
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def _encodings(manifest: dict) -> dict[str, int]:
    """How many (layer, level) pairs each encoding stores."""
    counts: dict[str, int] = {}
    for layer in manifest["layers"].values():
        for entry in layer["levels"].values():
            counts[entry["enc"]] = counts.get(entry["enc"], 0) + 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic", default=None, help="llama3-8b: random blocks of that shape")
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--backend", default="sparsegpt")
    ap.add_argument("--levels", default=LEVELS)
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--db-dir", default=None, help="where to write the database (default: a temporary folder)")
    ap.add_argument("--model", default=None, help="model id, folder or .gguf (default: the embedded one)")
    ap.add_argument("--calib", default=None, help="calibration text (default: the C4 sample)")
    ap.add_argument("--with-profile", action="store_true", help="measure the profile in the same pass")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.synthetic:
        model = synthetic(args.synthetic, args.blocks, dtype, args.device)
        calib = torch.randint(model.config.vocab_size, (args.calib_samples, args.seq_len))
        model_name, total_blocks = args.synthetic, 32
    else:
        loaded = load_model(args.model, dtype=dtype, device=args.device)
        model = loaded.model
        records = data.load_records(args.calib or data.default_calibration())
        calib = data.calibration_sequences(
            loaded.tokenizer, records, args.seq_len, args.calib_samples, seed=0, bos=data.bos_token_id(loaded.tokenizer)
        )
        model_name, total_blocks = loaded.model_id, model.config.num_hidden_layers
    inventory = Inventory.from_model(model)
    grid = parse_grid(args.levels)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory(dir=args.db_dir) as tmp:
        start = time.perf_counter()
        if args.with_profile:
            with DatabaseWriter(inventory, with_dense(grid), args.backend, Path(tmp) / "db", calib) as writer:
                Profile.measure(model, inventory, grid, args.backend, calib, batch_size=4, also=[writer])
            db = LevelDatabase(Path(tmp) / "db", writer.written)
        else:
            db = LevelDatabase.build(model, inventory, grid, args.backend, Path(tmp) / "db", calib, batch_size=4)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "model": model_name,
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "backend": args.backend,
        "levels": [lv.name for lv in grid],
        "layers": len(inventory.layers),
        "blocks_built": inventory.n_blocks,
        "calibration_tokens": int(calib.numel()),
        "build_s": seconds,
        "per_block_s": seconds / inventory.n_blocks,
        "full_model_estimate_s": seconds / inventory.n_blocks * total_blocks,
        "with_profile": args.with_profile,
        "database_bytes": db.manifest["bytes"],
        "full_copy_bytes": db.manifest["full_copy_bytes"],
        "bytes_vs_full_copies": db.manifest["bytes"] / db.manifest["full_copy_bytes"],
        "encodings": _encodings(db.manifest),
        "full_model_bytes_estimate": db.manifest["bytes"] / inventory.n_blocks * total_blocks,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else None,
    }
    write_json_atomic(Path(args.out).with_suffix(".json"), result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
