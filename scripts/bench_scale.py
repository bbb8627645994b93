"""Issue 31: the whole Llama-3-8B-shaped model (32 blocks, random bf16 weights) through the default pipeline on one GPU.

Phases as ``allocator run --method knapsack`` runs them (load, profile + level database in one calibration pass,
fitted sensitivity, knapsack, apply from the database, evaluation), then evolution from the knapsack plan for 20
generations (its candidate tokens/s beside a plain bf16 forward of the same model and batch shape, in the same run),
optionally the old apply (the backend run again on the dense model), and a larger grid's database checked against
the disk (refused before any work when it cannot fit). Per phase: wall time, peak GPU memory, peak host memory
(RSS so far), bytes in the cache folder.

GPU (device tool; carry .gpu/tok, the SmolLM2 tokenizer, and .whl, the wheels the GPU image lacks):
    bash scripts/gpu_real_model.sh scale
CPU smoke run:
    python scripts/bench_scale.py --hidden 256 --blocks 2 --vocab 49152 --generations 1 --out /tmp/scale/bench
"""

from __future__ import annotations

import argparse
import resource
import shlex
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_evolution import forward_rate  # noqa: E402

from allocator.backends import get_backend  # noqa: E402
from allocator.backends.db_files import estimate_bytes  # noqa: E402
from allocator.budget import build_problem  # noqa: E402
from allocator.errors import AllocatorError  # noqa: E402
from allocator.io import write_json_atomic, write_text_atomic  # noqa: E402
from allocator.levels import parse_grid, with_dense  # noqa: E402
from allocator.model import LoadedModel, load_model  # noqa: E402
from allocator.pipeline import prepare  # noqa: E402
from allocator.report import save_figure  # noqa: E402
from allocator.search import SearchContext, allocate, make_searcher  # noqa: E402
from allocator.session import Session  # noqa: E402
from allocator.spec import RunConfig, resolve  # noqa: E402


def synthetic(hidden: int, blocks: int, dtype: torch.dtype, device: str, vocab: int = 128256) -> torch.nn.Module:
    """Random weights in Llama-3-8B's shapes (hidden 4096: the real model; smaller: the same proportions)."""
    import transformers

    scale = hidden / 4096
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=int(14336 * scale), num_attention_heads=max(1, int(32 * scale)),
        num_key_value_heads=max(1, int(8 * scale)), num_hidden_layers=blocks, vocab_size=vocab,
        max_position_embeddings=8192, rope_theta=500000.0,
    )  # fmt: skip
    torch.manual_seed(0)  # the same weights every call: a cached database stays valid on a warm machine
    with torch.device(device):
        return transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


class Phases:
    """Wall time, peak GPU memory, peak RSS and cache bytes of each phase."""

    def __init__(self, device: str, cache: Path, out: Path) -> None:
        self.device, self.cache, self.out, self.rows = device, cache, out, []

    @contextmanager
    def __call__(self, name: str, **extra):
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        row = {"phase": name, **extra}
        yield row
        if cuda:
            torch.cuda.synchronize()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB -> GB (Linux)
        row.update(wall_s=time.perf_counter() - t0, peak_host_gb=rss,
                   peak_gpu_gb=torch.cuda.max_memory_allocated() / 1e9 if cuda else 0.0,
                   disk_gb=sum(f.stat().st_size for f in self.cache.rglob("*") if f.is_file()) / 1e9)  # fmt: skip
        self.rows.append(row)
        print(row, flush=True)
        write_json_atomic(self.out.with_suffix(".phases.json"), self.rows)  # kept if the run is cut off


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--blocks", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--levels", default="0:0.9:0.1")
    ap.add_argument("--refuse-levels", default="0:0.9:0.05", help="a larger grid whose database is checked too")
    ap.add_argument("--backend", default="sparsegpt")
    ap.add_argument("--target", default="sparsity=0.5")
    ap.add_argument("--sensitivity", default=None, help="default: the device's (fitted on a GPU)")
    ap.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: the embedded model's)")
    ap.add_argument("--calib", default=None)
    ap.add_argument("--eval", default=None)
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--eval-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--generations", type=int, default=20)
    ap.add_argument("--rerun", action="store_true", help="also time apply by re-running the backend (the old way)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cache-dir", default="/tmp/allocator-scale")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    cache, out = Path(args.cache_dir), Path(args.out)
    cache.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    config = RunConfig(calib=args.calib, eval=args.eval, backend=args.backend, levels=args.levels, target=args.target,
                       method="knapsack", calib_samples=args.calib_samples, eval_samples=args.eval_samples,
                       seq_len=args.seq_len, batch_size=args.batch_size, device=args.device, dtype=dtype,
                       cache_dir=str(cache), dense_cache=False, sensitivity=args.sensitivity)  # fmt: skip
    spec = resolve(config)
    phase = Phases(args.device, cache, out)
    result = {"command": "python " + shlex.join(sys.argv), "device": _device_name(args.device),
              "torch": torch.__version__, "levels": args.levels, "backend": args.backend, "target": args.target,
              "phases": phase.rows}  # fmt: skip
    torch.set_grad_enabled(False)
    with phase("load"):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer) if args.tokenizer else load_model().tokenizer
        model = synthetic(args.hidden, args.blocks, getattr(torch, dtype), args.device, args.vocab)
        session = Session(config, LoadedModel(model, tokenizer, f"synthetic-llama3-8b-h{args.hidden}-b{args.blocks}"))
    result["params"] = session.inventory.params
    grid = list(spec.grid)
    with phase("profile + database", levels=len(grid)):
        session.profile(grid, args.backend, with_database=True)
    problem = build_problem(session.inventory, grid, spec.budget)
    with phase("sensitivity", kind="fitted" if spec.fitter else spec.sensitivity) as row:
        problem, _, _, record = prepare(spec, session, problem)
        row["prior"] = (record or {}).get("prior")  # what ``auto`` chose
    result["database_bytes"] = session.find_database(grid, args.backend).manifest["bytes"]
    result["fitted"] = {k: v for k, v in record.items() if k not in ("choices", "kl", "weights")}
    with phase("knapsack"):
        plan = allocate(problem, spec.searcher, SearchContext(0))
    with phase("apply (from the database)"):
        session.compress_(plan.assignment, args.backend, session.find_database(grid, args.backend))
    with phase("evaluate"):
        result["knapsack"] = {k: v for k, v in session.measure(plan.assignment, args.backend).items() if k != "timings"}
    result["whole_run_s"] = sum(r["wall_s"] for r in phase.rows)
    evolution_phase(args, spec, session, problem, phase, result)
    if args.rerun:
        with phase("apply (backend re-run, the old way)"):
            session.compress_(plan.assignment, args.backend, None)
    refusal(args, session, phase, result)
    result["peak_gpu_gb"] = max(r["peak_gpu_gb"] for r in phase.rows)
    result["max_disk_gb"] = max(r["disk_gb"] for r in phase.rows)
    write_json_atomic(out.with_suffix(".json"), result)
    write_summary(result, out)


def evolution_phase(args, spec, session: Session, problem, phase: Phases, result: dict) -> None:
    """Evolution from the knapsack plan, and a plain forward of the same batch shape, in this process."""
    from allocator.fitness import KLFitness

    evo = make_searcher("evolution", start="knapsack", generations=args.generations, offspring=16,
                        stages="4@2048,1@8192")  # fmt: skip
    session.restore_()
    with phase("evolution", generations=args.generations) as row:
        fitness = KLFitness(session.model, session.inventory, problem, session.database(list(spec.grid), args.backend),
                            session.calib, args.batch_size)  # fmt: skip
        t0 = time.perf_counter()
        found = allocate(problem, evo, SearchContext(0, fitness))
        seconds = time.perf_counter() - t0
        row["candidate_tokens"] = sum(h["tokens"] for h in found.history)
        row["candidate_tokens_per_s"] = row["candidate_tokens"] / seconds
    session.restore_()
    with phase("plain forward") as row:
        row["tokens_per_s"] = forward_rate(session.model, session.calib, args.batch_size, args.device)
    result["evolution_vs_forward"] = phase.rows[-2]["candidate_tokens_per_s"] / row["tokens_per_s"]


def refusal(args, session: Session, phase: Phases, result: dict) -> None:
    """The larger grid's database against the free disk: refused before any work when it cannot fit."""
    grid = parse_grid(args.refuse_levels)
    dtype = next(session.model.parameters()).dtype
    needed = estimate_bytes(session.inventory, with_dense(grid), not get_backend(args.backend).hessian, dtype)
    free = shutil.disk_usage(args.cache_dir).free
    entry = {"levels": args.refuse_levels, "estimated_bytes": needed, "free_bytes": free}
    if needed > free:
        before = sorted(Path(args.cache_dir).rglob("*"))
        with phase("refusal", levels=len(grid)) as row:
            try:
                session.database(grid, args.backend)
            except AllocatorError as exc:
                row["error"] = entry["error"] = f"error: {exc}"
        entry["nothing_written"] = sorted(Path(args.cache_dir).rglob("*")) == before
    result["larger_grid"] = entry


def write_summary(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [f"`{result['command']}`\n", f"{result['device']}, torch {result['torch']}, {result['params'] / 1e9:.2f}B "
             f"compressible parameters, {result['backend']} at {result['target']}, levels {result['levels']}\n",
             "| phase | wall s | peak GPU GB | peak host GB | cache GB | notes |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["phases"]:
        notes = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()
                          if k not in ("phase", "wall_s", "peak_gpu_gb", "peak_host_gb", "disk_gb"))  # fmt: skip
        lines.append(f"| {r['phase']} | {r['wall_s']:.1f} | {r['peak_gpu_gb']:.1f} | {r['peak_host_gb']:.1f} | "
                     f"{r['disk_gb']:.1f} | {notes} |")  # fmt: skip
    lines.append(f"\nWhole knapsack run (load to evaluate): {result['whole_run_s']:.0f} s; evolution at "
                 f"{result['evolution_vs_forward']:.0%} of the plain forward's tokens/s.")  # fmt: skip
    larger = result["larger_grid"]
    lines.append(f"\nLarger grid {larger['levels']}: database estimated {larger['estimated_bytes'] / 1e9:.1f} GB, "
                 f"{larger['free_bytes'] / 1e9:.1f} GB free. {larger.get('error', 'fits: not refused')}")  # fmt: skip
    write_text_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["phase"] for r in result["phases"]]
    ax.barh(names, [r["wall_s"] for r in result["phases"]])
    ax.invert_yaxis()
    ax.set(xlabel="wall time (s)", title=f"{result['params'] / 1e9:.1f}B-parameter Llama-3-shaped model, one GPU")
    save_figure(fig, out.with_suffix(".png"))


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"


if __name__ == "__main__":
    main()
