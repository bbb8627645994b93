"""The ``allocator`` command line: parse flags, call the API, print. Errors: one line, exit 2."""

from __future__ import annotations

import argparse
import logging
import sys

from allocator.errors import AllocatorError
from allocator.levels import DEFAULT_GRID
from allocator.pipeline import RunConfig, run


def _samples(text: str) -> int | None:
    return None if text == "all" else int(text)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per verb)."""
    parser = argparse.ArgumentParser(prog="allocator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="allocate under a budget, compress, evaluate, write plan.json + metrics.json")
    d = RunConfig()
    r.add_argument("--target", default=d.target, help="budget, e.g. sparsity=0.5, bits=3.5, bytes=5e7")
    r.add_argument("--method", default=d.method, help="allocation method (uniform)")
    r.add_argument("--backend", default=d.backend, help="compression backend (magnitude)")
    r.add_argument("--model", default=None, help="hub id, local folder or .gguf (default: embedded SmolLM2-135M)")
    r.add_argument("--calib", default=None, help="calibration text: file, folder, .parquet or NAME[:CONFIG][@SPLIT]")
    r.add_argument("--eval", default=None, help="evaluation text (default: WikiText-2 raw test)")
    r.add_argument("--levels", default=DEFAULT_GRID, help="level grid, e.g. 0:0.9:0.1 or dense,2:4,w4g128")
    r.add_argument("--per", default=d.per, choices=["layer", "tie-group"], help="allocate per layer or tie group")
    r.add_argument("--seq-len", type=int, default=d.seq_len)
    r.add_argument("--calib-samples", type=int, default=d.calib_samples)
    r.add_argument("--kl-samples", type=int, default=d.kl_samples)
    r.add_argument("--eval-samples", type=_samples, default=d.eval_samples, help="windows to evaluate, or 'all'")
    r.add_argument("--batch-size", type=int, default=d.batch_size)
    r.add_argument("--seed", type=int, default=d.seed)
    r.add_argument("--dtype", default=d.dtype, help="float32, bfloat16 or float16")
    r.add_argument("--device", default=d.device)
    r.add_argument("--plan", default=None, help="apply this saved plan.json instead of searching")
    r.add_argument("--output-dir", "-o", default=None, help="run folder (default: runs/<method>-<target>)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            return _run(args)
    except AllocatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1


def _run(args: argparse.Namespace) -> int:
    fields = {k: v for k, v in vars(args).items() if k != "command"}
    fields["output_dir"] = fields["output_dir"] or f"runs/{args.method}-{args.target.replace('=', '')}"
    result = run(RunConfig(**fields))
    m = result.metrics
    achieved = m["achieved"]
    print(f"model {m['model']}  budget {m['budget']}  method {m['method']}  backend {m['backend']}")
    print(f"achieved: sparsity {achieved['sparsity']:.6f}  bits {achieved['bits']:.4f}  bytes {achieved['bytes']:.0f}")
    print(f"dense perplexity       {m['dense_perplexity']:.3f}")
    print(f"compressed perplexity  {m['perplexity']:.3f}")
    print(f"KL to dense (nats/tok) {m['kl_to_dense']:.5f}")
    print(f"wrote {result.output_dir}/plan.json, metrics.json, config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
