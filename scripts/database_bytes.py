"""Issue 31: what a level database takes on disk, per level, for the Llama-3-8B-shaped model — before building it.

The estimate the run checks against the free disk (:func:`allocator.backends.database.estimate_bytes`), split into
what each level adds, for a backend whose pruning levels are nested (Wanda, magnitude: one shared order) and one
whose are not (SparseGPT: a mask and the kept values per level), at the 10- and 19-level sparsity grids and a bit
grid; beside them the one database the H100 built (results/bench_scale.phases.json). The model is built on the meta
device: no memory, no weights.

    python scripts/database_bytes.py --out results/database_bytes
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import synthetic  # noqa: E402

from allocator.backends.db_files import estimate_bytes  # noqa: E402
from allocator.inventory import Inventory  # noqa: E402
from allocator.io import write_json_atomic, write_text_atomic  # noqa: E402
from allocator.levels import parse_grid, with_dense  # noqa: E402

GRIDS = {"sparsity 0:0.9:0.1": "0:0.9:0.1", "sparsity 0:0.9:0.05": "0:0.9:0.05", "bits": "w8,w4g128,w3g128,w2g64"}
BACKENDS = {"sparsegpt / gptq (a mask and kept values per level)": False, "wanda / magnitude (nested orders)": True}


def per_level(inventory: Inventory, grid: str, nested: bool, dtype: torch.dtype) -> dict:
    """The whole estimate and what each level adds to it (the files' headers and a shared order stand alone)."""
    levels = with_dense(parse_grid(grid))
    total = estimate_bytes(inventory, levels, nested, dtype)
    rows = {"headers": estimate_bytes(inventory, with_dense([]), nested, dtype)}
    for level in levels[1:]:
        rows[level.name] = total - estimate_bytes(inventory, [lv for lv in levels if lv is not level], nested, dtype)
    rows["shared (nested order, rounding)"] = total - sum(rows.values())
    return {"total": total, "levels": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--disk-gb", type=float, default=64.0, help="the disk the database must fit (the GPU machine's)")
    args = ap.parse_args()
    with torch.device("meta"):
        model = synthetic(4096, 32, torch.bfloat16, "meta")
    inventory = Inventory.from_model(model)
    result = {"command": "python " + shlex.join(sys.argv), "params": inventory.params, "dtype": "bfloat16",
              "disk_gb": args.disk_gb, "estimates": {}}  # fmt: skip
    for backend, nested in BACKENDS.items():
        for label, grid in GRIDS.items():
            result["estimates"][f"{backend} | {label}"] = per_level(inventory, grid, nested, torch.bfloat16)
    measured = Path("results/bench_scale.phases.json")
    if measured.is_file():
        phases = {p["phase"]: p for p in json.loads(measured.read_text())}
        result["measured_h100_sparsegpt_10_levels_gb"] = phases.get("profile + database", {}).get("disk_gb")
    out = Path(args.out)
    write_json_atomic(out.with_suffix(".json"), result)
    lines = [f"# Level database bytes, Llama-3-8B-shaped ({inventory.params / 1e9:.2f}B compressible, bfloat16)\n",
             f"`{result['command']}` — estimates before any build (high side by design); "
             f"a {args.disk_gb:.0f} GB disk; every figure holds the estimate's 10 % margin\n",
             "| backend | grid | levels | estimate GB | fits | largest levels (GB) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for key, est in result["estimates"].items():
        backend, label = key.split(" | ")
        top = sorted(((v, k) for k, v in est["levels"].items()), reverse=True)[:4]
        big = ", ".join(f"{k} {v / 1e9:.1f}" for v, k in top)
        fits = "yes" if est["total"] <= args.disk_gb * 1e9 else "**no: refused before work**"
        lines.append(f"| {backend} | {label} | {len(est['levels']) - 1} | {est['total'] / 1e9:.1f} | {fits} | {big} |")
    if gb := result.get("measured_h100_sparsegpt_10_levels_gb"):
        lines.append(f"\nBuilt on the H100 (SparseGPT, sparsity 0:0.9:0.1; `results/bench_scale.md`): {gb:.1f} GB "
                     "on disk (format 3, which also stored the dense weights, took 51.5 GB).")  # fmt: skip
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
