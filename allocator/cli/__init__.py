"""The ``allocator`` command line: parse flags into settings, call the API, print. Errors: one line, exit 2."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from allocator.about import __version__
from allocator.budget import PER
from allocator.cli import latency, verbs
from allocator.errors import AllocatorError
from allocator.export import EXPORTERS
from allocator.formats import ANY, FORMATS, GPUS
from allocator.levels import DEFAULT_GRID
from allocator.search import SEARCHERS, option_fields
from allocator.sensitivity import SENSITIVITIES
from allocator.spec import RunConfig


def _samples(text: str) -> int | None:
    return None if text == "all" else int(text)


def _common(p: argparse.ArgumentParser) -> None:
    """Flags shared by every verb that loads a model and data."""
    d = RunConfig()
    p.add_argument("--model", default=None, help="hub id, local folder or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--calib", default=None, help="calibration text: file, folder, .parquet or NAME[:CONFIG][@SPLIT]")
    p.add_argument("--eval", default=None, help="evaluation text (default: WikiText-2 raw test)")
    p.add_argument("--backend", default=d.backend, help="magnitude, wanda, sparsegpt, rtn or gptq")
    p.add_argument(
        "--levels",
        default=None,
        help=f"level grid, e.g. 0:0.9:0.1 or dense,2:4,w4g128 (default: {DEFAULT_GRID}, or the --format's)",
    )
    p.add_argument("--format", default=d.format, choices=[ANY, *FORMATS],
                   help="deployment format: only the levels it stores and runs, priced as it stores them "
                   "(llamacpp: GGUF types; vllm: compressed-tensors; gptqmodel; autoround)")  # fmt: skip
    p.add_argument("--gpu", default=d.gpu, choices=list(GPUS),
                   help="with --format vllm: only schemes vLLM runs on this GPU (h100: no NVFP4 W4A4)")  # fmt: skip
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--calib-samples", type=int, default=d.calib_samples)
    p.add_argument("--kl-samples", type=int, default=d.kl_samples)
    p.add_argument("--eval-samples", type=_samples, default=d.eval_samples, help="windows to evaluate, or 'all'")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=d.dtype, help="float32, bfloat16 or float16")
    p.add_argument("--device", default=d.device)
    p.add_argument("--cache-dir", default=None,
                   help="where measurements are cached (default: $ALLOCATOR_CACHE or ~/.cache/allocator)")  # fmt: skip
    p.add_argument("--no-dense-cache", dest="dense_cache", action="store_false",
                   help="measure the dense reference again instead of reusing an earlier run's")  # fmt: skip
    p.add_argument("--sequential", action="store_true",
                   help="calibrate each block on the compressed blocks' outputs (the papers' way) instead of the "
                   "dense activations the level database and the searches see")  # fmt: skip


def _task_flags(p: argparse.ArgumentParser) -> None:
    """Downstream accuracy beside perplexity: flags of ``run`` and ``compare``."""
    p.add_argument("--tasks", default=None,
                   help="lm-evaluation-harness tasks scored on each plan's model beside perplexity: names "
                   "(arc_easy,hellaswag) or task .yaml files (pip install 'allocator[eval]')")  # fmt: skip
    p.add_argument("--tasks-limit", type=int, default=None, help="items per --tasks task (default: all)")


def _search_flags(p: argparse.ArgumentParser) -> None:
    """How a plan is searched for: flags of ``run`` and ``compare`` (searcher options from their declarations)."""
    d = RunConfig()
    p.add_argument("--per", default=d.per, choices=list(PER),
                   help="one level per layer, per tie group (q/k/v, gate/up), or per expert role (MoE); "
                        "default: tie groups where the format's engine fuses them (vllm, gptqmodel, autoround), "
                        "else layers")  # fmt: skip
    p.add_argument("--profile", default=None, help="use this profile .parquet (default: reuse or measure)")
    p.add_argument("--sensitivity", default=d.sensitivity, choices=list(SENSITIVITIES),
                   help="what knapsack, optuna's compact space and a knapsack start minimise: error (relative "
                   "output error), fisher (Fisher-weighted, in nats), kl (measured per layer), fitted (a prior "
                   "re-weighted to the measured KL of real plans by the fitted search); default: fisher on a CPU, "
                   "fitted on a GPU")  # fmt: skip
    p.add_argument(
        "--fit-seqs",
        type=int,
        default=d.fit_seqs,
        help="kl/fitted: calibration windows measured (default: 8 on a GPU, 2 on a CPU)",
    )
    p.add_argument("--resume", action="store_true", help="continue a killed evolution/fitted/optuna search here")
    for name, (f, _) in option_fields().items():  # every searcher option, from its declaration
        flag = "--" + name.replace("_", "-")
        if f.metadata["kind"] is bool:
            p.add_argument(flag, dest=name, action="store_true", help=f.metadata["help"])
            continue
        choices = f.metadata["choices"]
        p.add_argument(flag, dest=name, type=f.metadata["kind"], default=f.default, help=f.metadata["help"],
                       choices=choices, metavar="|".join(choices) if choices else None)  # fmt: skip
    p.add_argument("--latency-table", default=None, help="latency/speedup budgets: a table from `allocator latency`")
    p.add_argument("--latency-tokens", type=int, default=d.latency_tokens, help="token count latency budgets hold at")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per verb)."""
    parser = argparse.ArgumentParser(prog="allocator", description=__doc__)
    parser.add_argument("--version", action="version", version=f"allocator {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    d = RunConfig()
    r = sub.add_parser("run", help="allocate under a budget, compress, evaluate, write plan.json + metrics.json")
    _common(r)
    r.add_argument("--target", default=d.target, help="budget(s), e.g. sparsity=0.5 or bits=3.5,bytes=6e7")
    r.add_argument("--method", default=d.method, help=f"allocation method: {', '.join(SEARCHERS)}")
    _search_flags(r)
    _task_flags(r)
    r.add_argument("--plan", default=None, help="apply this saved plan.json instead of searching")
    r.add_argument("--output-dir", "-o", default=None, help="run folder (default: runs/<method>-<target>)")
    p = sub.add_parser("profile", help="measure (or reuse) the layer x level sensitivity profile")
    _common(p)
    p.add_argument("--output", "-o", default=None, help="also save the profile here")
    p.add_argument(
        "--kl-pool",
        type=int,
        default=0,
        help="also measure end-to-end KL with only one layer compressed, on this many calibration windows",
    )
    a = sub.add_parser("apply", help="compress a model by a plan and save a Hugging Face checkpoint")
    a.add_argument("plan", help="plan.json (its backend, settings and data are recorded in it)")
    a.add_argument("--output-dir", "-o", required=True, help="checkpoint folder (must be new or empty)")
    for flag in ("--model", "--calib", "--eval", "--backend", "--device", "--dtype", "--cache-dir"):
        a.add_argument(flag, default=None, help="override the plan's setting")
    for flag in ("--calib-samples", "--eval-samples", "--batch-size"):
        a.add_argument(flag, type=int, default=None, help="override the plan's setting")
    a.add_argument(
        "--sequential",
        action="store_const",
        const=True,
        default=None,
        help="calibrate each block on the compressed blocks' outputs (override the plan's setting)",
    )
    a.add_argument("--checkpoint", choices=["compressed-tensors", "gguf", "hf"], default=None,
                   help="what to write (default: gguf for a llama.cpp plan, compressed-tensors for a quantized plan, "
                   "else hf: de-quantized weights with zeros)")  # fmt: skip
    e = sub.add_parser("export", help="write a plan in another toolkit's format")
    e.add_argument("plan", help="plan.json")
    e.add_argument("--to", required=True, choices=list(EXPORTERS), help="the toolkit's format")
    e.add_argument("--output-dir", "-o", default=None, help="default: exports/<format> beside the plan")
    e.add_argument("--backend", default=None, help="pruner for llm-compressor (default: the plan's backend)")
    for sub_parser in (r, a, e):
        sub_parser.add_argument("--allow-over-budget", action="store_true",
                                help="with a saved plan: accept one that breaks its budget (recorded)")  # fmt: skip
    c = sub.add_parser("compare", help="methods x budgets x evaluation texts on one model, with intervals")
    _common(c)
    _search_flags(c)
    _task_flags(c)
    c.add_argument("--methods", default="uniform,owl,knapsack", help=f"comma-separated: {', '.join(SEARCHERS)}")
    c.add_argument("--targets", default="sparsity=0.4;sparsity=0.5;sparsity=0.6",
                   help="budgets separated by ';' (each may hold several: bits=4,bytes=6e7)")  # fmt: skip
    c.add_argument("--texts", default=None,
                   help="evaluation texts separated by ',' (default: --eval, or WikiText-2 test)")  # fmt: skip
    c.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the windows")
    c.add_argument("--output-dir", "-o", required=True, help="comparison folder (a killed run continues there)")
    rep = sub.add_parser("report", help="Markdown report (plots included) of a run folder or a folder of runs")
    rep.add_argument("folder")
    latency.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    handlers = {"run": verbs.run, "profile": verbs.profile, "apply": verbs.apply, "export": verbs.export,
                "report": verbs.report, "compare": verbs.compare, "latency": latency.run}  # fmt: skip
    try:
        return handlers[args.command](args)
    except AllocatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # every file is written atomically: nothing half-written stays behind
        print("interrupted: nothing half-written was kept; a checkpointed search continues with --resume "
              "(the same command and --output-dir)", file=sys.stderr)  # fmt: skip
        return 130
    except BrokenPipeError:  # `allocator ... | head`: the reader left; end quietly as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 141


if __name__ == "__main__":
    sys.exit(main())
