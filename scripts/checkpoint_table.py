"""Issues 29/30: what allocator measures against what the engine's format holds, on the real model.

Each recipe is a run (plan) on one session, scored on WikiText-2 and held-out C4 (never calibrated on); its plan is
then applied (``allocator apply``: the engine's checkpoint), the checkpoint is loaded by the consumer's own loader
(transformers + compressed-tensors; transformers' GGUF reader, and llama.cpp's llama-perplexity with ``--llama-bin``)
and scored on the same windows. Beside them: planned bits/weight, bytes priced and written, bytes on disk, and the
plan's predicted latency where a table is given and measures every kernel of the plan.

    python scripts/checkpoint_table.py --set issue29 --out results/checkpoints_issue29
    python scripts/checkpoint_table.py --set issue30 --out results/checkpoints_issue30 \
        --latency-table profiles/latency/nvidia-h100-80gb-hbm3/smollm2-135m.csv
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sensitivity import split_c4  # noqa: E402

from allocator import data  # noqa: E402
from allocator.apply import apply_plan  # noqa: E402
from allocator.compare import _evaluate, _windows  # noqa: E402
from allocator.errors import AllocatorError  # noqa: E402
from allocator.evaluate import window_nll  # noqa: E402
from allocator.io import write_json_atomic, write_text_atomic  # noqa: E402
from allocator.latency.table import LatencyTable  # noqa: E402
from allocator.pipeline import run  # noqa: E402
from allocator.plan import Plan  # noqa: E402
from allocator.session import Session  # noqa: E402
from allocator.spec import RunConfig, resolve  # noqa: E402

# SmolLM2's 576-wide inputs split into groups of 64, not 128: its W4A16 levels are int4 g64 (vLLM runs 32/64/128)
VLLM4 = "dense,fp8+afp8,w4g64,nvfp4"
RECIPES = {
    "issue29": {
        "vllm knapsack int8/int4 4.5 bits": dict(method="knapsack", format="vllm", levels="dense,w8,w4g64",
                                                 target="bits=4.5", backend="gptq"),
        "sparsity knapsack 0.5 (dense zeros)": dict(method="knapsack", levels="0:0.9:0.1", target="sparsity=0.5",
                                                    backend="sparsegpt"),
        "llamacpp knapsack 5 bits": dict(method="knapsack", format="llamacpp", levels="q8_0,q5_0,q4_1,q4_0",
                                         target="bits=5", backend="rtn"),
    },
    "issue30": {
        "uniform BF16": dict(method="uniform", levels="dense", target="bits=16"),
        "uniform FP8 W8A8": dict(method="uniform", levels="dense,fp8+afp8", target="bits=8.5"),
        "uniform INT8 W8A8": dict(method="uniform", levels="dense,w8+a8", target="bits=8.5"),
        "uniform W4A16 int4 g64": dict(method="uniform", levels="dense,w4g64", target="bits=4.5"),
        "uniform NVFP4": dict(method="uniform", levels="dense,nvfp4", target="bits=4.51"),  # + a per-tensor scale
        "uniform MXFP4": dict(method="uniform", levels="dense,mxfp4", target="bits=4.5"),
        "knapsack {bf16,fp8,w4g64,nvfp4} 4.5": dict(method="knapsack", levels=VLLM4, target="bits=4.5",
                                                     format="vllm"),  # one scheme per fused group: loadable
        "knapsack {bf16,fp8,w4g64,nvfp4} 6": dict(method="knapsack", levels=VLLM4, target="bits=6", format="vllm"),
        "knapsack {bf16,fp8,int8 w8a8,w4g64} 6": dict(method="knapsack", levels="dense,fp8+afp8,w8+a8,w4g64",
                                                       target="bits=6", format="vllm"),
    },
}  # fmt: skip


def checkpoint_perplexity(folder: Path, windows: dict[str, torch.Tensor], batch: int, device: str,
                          dtype: torch.dtype) -> dict:  # fmt: skip
    """The written checkpoint as its consumer loads it (transformers; compressed-tensors decompresses), scored."""
    from transformers import AutoModelForCausalLM

    gguf = folder / "model.gguf"
    kwargs = {"gguf_file": gguf.name} if gguf.is_file() else {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device, **kwargs).eval()
    with torch.no_grad():  # the estimator of the allocator column (exp of the mean window NLL), on the same windows
        return {t: math.exp(window_nll(model, w, batch).mean()) for t, w in windows.items()}


def llama_perplexity(binary: Path, gguf: Path, text: str, chunks: int, ctx: int) -> float:
    """llama.cpp's own perplexity of ``gguf`` on the first ``chunks`` windows of ``text`` (its final estimate)."""
    out = subprocess.run([str(binary / "llama-perplexity"), "-m", str(gguf), "-f", text, "-c", str(ctx),
                          "--chunks", str(chunks), "-t", "2"], capture_output=True, text=True, check=True)  # fmt: skip
    final = [line for line in out.stderr.splitlines() + out.stdout.splitlines() if "Final estimate: PPL" in line]
    return float(final[-1].split("=")[1].split()[0])


def disk_bytes(folder: Path) -> int:
    weights = [*folder.glob("*.safetensors"), *folder.glob("*.gguf")]
    return sum(f.stat().st_size for f in weights)


def predict(table: LatencyTable | None, plan: Plan, session: Session) -> dict:
    if table is None:
        return {}
    out = {}
    for name, tokens in (("decode_ms", 1), ("prefill_ms", 512)):
        try:
            p = table.predict(plan.assignment, session.inventory, tokens)
            out[name], out[name.replace("_ms", "_speedup")] = p["predicted_ms"], p["speedup"]
        except AllocatorError as exc:
            out[name] = f"n/a: {exc}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=sorted(RECIPES), required=True)
    ap.add_argument("--only", default=None, help="recipe names (comma-separated substrings) to run")
    ap.add_argument("--model", default=None)
    ap.add_argument("--c4", default=None)
    ap.add_argument("--wikitext", default=None)
    ap.add_argument("--backend", default="gptq", help="backend of recipes that name none")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", help="the model's dtype, as it is served (scales are stored in it)")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--sensitivity", default=None, help="what the knapsacks minimise (default: the device's)")
    ap.add_argument("--latency-table", default=None)
    ap.add_argument("--llama-bin", default=None, help="folder with llama.cpp's llama-perplexity (GGUF rows)")
    ap.add_argument("--llama-chunks", type=int, default=32)
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default=None, help="run folders and checkpoints (default: OUT_runs beside the table)")
    args = ap.parse_args()
    out = Path(args.out)
    work = Path(args.work) if args.work else out.parent / (out.name + "_runs")
    work.mkdir(parents=True, exist_ok=True)
    calib, heldout = split_c4(Path(args.c4 or data.default_calibration()), 400, work)
    texts = [args.wikitext or data.default_evaluation(), heldout]
    config = RunConfig(model=args.model, calib=calib, eval=texts[0], calib_samples=args.calib_samples,
                       eval_samples=args.eval_samples, seq_len=args.seq_len, batch_size=args.batch_size,
                       device=args.device, dtype=args.dtype, cache_dir=args.cache_dir,
                       backend=args.backend, sensitivity=args.sensitivity)  # fmt: skip
    session = Session(config)
    windows = {t: session.eval_seqs if i == 0 else _windows(session, t, config) for i, t in enumerate(texts)}
    table = LatencyTable.load(args.latency_table) if args.latency_table else None
    done = json.loads(out.with_suffix(".json").read_text())["rows"] if out.with_suffix(".json").is_file() else []
    rows = [r for r in done if r["recipe"] in RECIPES[args.set]]
    wanted = [n for n in RECIPES[args.set] if not args.only or any(s in n for s in args.only.split(","))]
    for name in wanted:
        if any(r["recipe"] == name for r in rows):
            continue  # scored before a kill: kept
        recipe, cell = RECIPES[args.set][name], work / name.replace(" ", "_").replace("/", "-")
        spec = resolve(replace(config, **recipe, output_dir=str(cell / "run")))
        t0 = time.perf_counter()
        result = run(spec, session)
        simulated = {t: v["perplexity"] for t, v in _evaluate(session, windows, args.batch_size, 10).items()}
        metrics = apply_plan(cell / "run" / "plan.json", cell / "ckpt", {"cache_dir": args.cache_dir})
        loaded = checkpoint_perplexity(cell / "ckpt", windows, args.batch_size, args.device, getattr(torch, args.dtype))
        row = {"recipe": name, "checkpoint": metrics["checkpoint"], "bits": result.plan.achieved["bits"],
               "planned_bytes": metrics["size"]["planned_bytes"], "written_bytes": metrics["size"]["written_bytes"],
               "disk_bytes": disk_bytes(cell / "ckpt"),
               "levels": sorted({lv.name for lv in result.plan.assignment.values()}),
               **{f"allocator:{Path(t).name}": v for t, v in simulated.items()},
               **{f"checkpoint:{Path(t).name}": v for t, v in loaded.items()},
               **predict(table, result.plan, session), "time_s": time.perf_counter() - t0}  # fmt: skip
        if args.llama_bin and (cell / "ckpt" / "model.gguf").is_file():
            for t in texts:
                row[f"llama.cpp:{Path(t).name}"] = llama_perplexity(Path(args.llama_bin), cell / "ckpt" / "model.gguf",
                                                                    t, args.llama_chunks, args.seq_len)  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        write_json_atomic(out.with_suffix(".json"), {"command": "python " + shlex.join(sys.argv), "rows": rows})
    summarise(rows, out, "python " + shlex.join(sys.argv))


def summarise(rows: list[dict], out: Path, command: str) -> None:
    df = pd.DataFrame(rows)
    write_text_atomic(out.with_suffix(".csv"), df.to_csv(index=False))
    texts = [c.split(":", 1)[1] for c in df if c.startswith("allocator:")]
    lines = [f"`{command}`\n", "| plan | checkpoint | bits/w | written / priced | on disk MB | "
             + " | ".join(f"{t}: allocator | checkpoint" for t in texts)
             + (" | decode ms | prefill ms |" if "decode_ms" in df else " |")]  # fmt: skip
    lines.append("|" + "---|" * (lines[-1].count("|") - 1))
    for r in rows:
        ppl = " | ".join(f"{r[f'allocator:{t}']:.3f} | {r[f'checkpoint:{t}']:.3f}" for t in texts)
        lat = ""
        if "decode_ms" in r:
            lat = " | " + " | ".join(
                f"{r[k]:.3f}" if isinstance(r[k], float) else "n/a" for k in ("decode_ms", "prefill_ms")
            )
        ratio = r["written_bytes"] / r["planned_bytes"]
        lines.append(f"| {r['recipe']} | {r['checkpoint']} | {r['bits']:.3f} | {ratio:.4f} "
                     f"| {r['disk_bytes'] / 1e6:.1f} | {ppl}{lat} |")  # fmt: skip
    llama = [c for c in df if c.startswith("llama.cpp:")]
    for c in llama:
        for r in rows:
            if isinstance(r.get(c), float) and not math.isnan(r[c]):
                lines.append(f"\nllama-perplexity of {r['recipe']} on {c.split(':', 1)[1]}: {r[c]:.3f}")
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
