"""The ``allocator`` command line: parse flags, call the API, print. Errors: one line, exit 2."""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from allocator import artifacts
from allocator.apply import apply_plan, run_config
from allocator.budget import PER
from allocator.config import RunConfig
from allocator.errors import AllocatorError
from allocator.export import EXPORTERS, export
from allocator.formats import ANY, FORMATS, format_grid, get_format
from allocator.io import check_output
from allocator.latency import cli as latency_cli
from allocator.levels import DEFAULT_GRID
from allocator.pipeline import run
from allocator.plan import Plan
from allocator.report import write_run_report
from allocator.search import SEARCHERS, option_fields
from allocator.sensitivity import SENSITIVITIES
from allocator.session import Session


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
                   help="deployment target: only the levels it stores and runs, priced as it stores them "
                   "(llamacpp: GGUF types; vllm: compressed-tensors int4/int8; gptqmodel; autoround)")  # fmt: skip
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--calib-samples", type=int, default=d.calib_samples)
    p.add_argument("--kl-samples", type=int, default=d.kl_samples)
    p.add_argument("--eval-samples", type=_samples, default=d.eval_samples, help="windows to evaluate, or 'all'")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=d.dtype, help="float32, bfloat16 or float16")
    p.add_argument("--device", default=d.device)
    p.add_argument("--profiles-dir", default=d.profiles_dir, help="where profiles are saved and reused")
    p.add_argument("--no-dense-cache", dest="dense_cache", action="store_false",
                   help="measure the dense reference again instead of reusing an earlier run's")  # fmt: skip


def _search_flags(p: argparse.ArgumentParser) -> None:
    """How a plan is searched for: flags of ``run`` and ``compare``."""
    d = RunConfig()
    p.add_argument("--per", default=d.per, choices=list(PER),
                   help="one level per layer, per tie group (q/k/v, gate/up), or per expert role (MoE)")  # fmt: skip
    p.add_argument("--profile", default=None, help="use this profile .parquet (default: reuse or measure)")
    p.add_argument("--sensitivity", default=d.sensitivity, choices=list(SENSITIVITIES),
                   help="what knapsack, optuna's compact space and a knapsack start minimise: error (relative "
                   "output error), fisher (Fisher-weighted, in nats), kl (measured per layer), fitted (a prior "
                   "re-weighted to the measured KL of real plans)")  # fmt: skip
    p.add_argument(
        "--fit-prior",
        default=d.fit_prior,
        choices=["auto", "kl", "fisher"],
        help="fitted: the per-layer prior it re-weights (auto: kl on a GPU or if already measured)",
    )
    p.add_argument("--fit-seqs", type=int, default=d.fit_seqs, help="kl/fitted: calibration windows measured")
    p.add_argument("--fit-plans", type=int, default=d.fit_plans, help="fitted: random plans before the first fit")
    p.add_argument("--fit-rounds", type=int, default=d.fit_rounds, help="fitted: knapsack-measure-refit rounds")
    p.add_argument("--resume", action="store_true", help="evolution/optuna: continue a killed run in the output folder")
    for name, (f, _) in option_fields().items():  # every searcher option, from its declaration
        flag = "--" + name.replace("_", "-")
        if f.metadata["kind"] is bool:
            p.add_argument(flag, dest=name, action="store_true", help=f.metadata["help"])
        else:
            p.add_argument(flag, dest=name, type=f.metadata["kind"], default=f.default, help=f.metadata["help"],
                           choices=f.metadata["choices"])  # fmt: skip
    p.add_argument("--latency-table", default=None, help="latency/speedup budgets: a table from `allocator latency`")
    p.add_argument("--latency-tokens", type=int, default=d.latency_tokens, help="token count latency budgets hold at")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (one sub-command per verb)."""
    parser = argparse.ArgumentParser(prog="allocator", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    d = RunConfig()
    r = sub.add_parser("run", help="allocate under a budget, compress, evaluate, write plan.json + metrics.json")
    _common(r)
    r.add_argument("--target", default=d.target, help="budget(s), e.g. sparsity=0.5 or bits=3.5,bytes=6e7")
    r.add_argument("--method", default=d.method, help=f"allocation method: {', '.join(SEARCHERS)}")
    _search_flags(r)
    r.add_argument("--plan", default=None, help="apply this saved plan.json instead of searching")
    r.add_argument("--allow-over-budget", action="store_true",
                   help="with --plan: accept a plan that breaks its budget (recorded in the metrics)")  # fmt: skip
    r.add_argument("--output-dir", "-o", default=None, help="run folder (default: runs/<method>-<target>)")
    p = sub.add_parser("profile", help="measure (or reuse) the layer x level sensitivity profile")
    _common(p)
    p.add_argument("--output", "-o", default=None, help="profile path (default: under --profiles-dir)")
    p.add_argument(
        "--kl-pool",
        type=int,
        default=0,
        help="also measure end-to-end KL with only one layer compressed, on this many calibration windows",
    )
    a = sub.add_parser("apply", help="compress a model by a plan and save a Hugging Face checkpoint")
    a.add_argument("plan", help="plan.json (settings are read from the config.json beside it)")
    a.add_argument("--output-dir", "-o", required=True, help="checkpoint folder (must be new or empty)")
    for flag in ("--model", "--calib", "--eval", "--backend", "--device", "--dtype"):
        a.add_argument(flag, default=None, help="override the run's setting")
    for flag in ("--calib-samples", "--eval-samples", "--batch-size"):
        a.add_argument(flag, type=int, default=None, help="override the run's setting")
    e = sub.add_parser("export", help="write a plan in another toolkit's format")
    e.add_argument("plan", help="plan.json")
    e.add_argument("--to", required=True, choices=list(EXPORTERS), help="target format")
    e.add_argument("--output-dir", "-o", default=None, help="default: exports/<format> beside the plan")
    e.add_argument("--backend", default=None, help="pruner for llm-compressor (default: the run's backend)")
    for sub_parser in (a, e):
        sub_parser.add_argument("--allow-over-budget", action="store_true",
                                help="accept a plan that breaks its budget (recorded in the metrics)")  # fmt: skip
    c = sub.add_parser("compare", help="methods x budgets x evaluation texts on one model, with intervals")
    _common(c)
    _search_flags(c)
    c.add_argument("--methods", default="uniform,owl,knapsack", help=f"comma-separated: {', '.join(SEARCHERS)}")
    c.add_argument("--targets", default="sparsity=0.4;sparsity=0.5;sparsity=0.6",
                   help="budgets separated by ';' (each may hold several: bits=4,bytes=6e7)")  # fmt: skip
    c.add_argument("--texts", default=None,
                   help="evaluation texts separated by ',' (default: --eval, or WikiText-2 test)")  # fmt: skip
    c.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the windows")
    c.add_argument("--output-dir", "-o", required=True, help="comparison folder (a killed run continues there)")
    rep = sub.add_parser("report", help="Markdown report (plots included) of a run folder or a folder of runs")
    rep.add_argument("folder")
    latency_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        verbs = {"run": _run, "profile": _profile, "apply": _apply, "export": _export, "report": _report,
                 "compare": _compare, "latency": latency_cli.run}  # fmt: skip
        return verbs[args.command](args)
    except AllocatorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _config(args: argparse.Namespace, **extra) -> RunConfig:
    names = set(RunConfig.__dataclass_fields__)
    given = vars(args)
    options = {name: given[name] for name in option_fields() if name in given}
    return RunConfig(**{**{k: v for k, v in given.items() if k in names}, "options": options, **extra})


def _run(args: argparse.Namespace) -> int:
    out = args.output_dir or f"runs/{args.method}-{args.target.replace('=', '').replace(',', '_')}"
    result = run(_config(args, output_dir=out))
    m = result.metrics
    achieved = m["achieved"]
    print(f"model {m['model']}  budget {m['budget']}  method {m['method']}  backend {m['backend']}")
    print(f"achieved: sparsity {achieved['sparsity']:.6f}  bits {achieved['bits']:.4f}  bytes {achieved['bytes']:.0f}")
    print(f"dense perplexity       {m['dense_perplexity']:.3f}")
    print(f"compressed perplexity  {m['perplexity']:.3f}")
    print(f"KL to dense (nats/tok) {m['kl_to_dense']:.5f}")
    if "latency" in m:
        lat = m["latency"]
        print(f"predicted latency      {lat['predicted_ms']:.4f} ms at {lat['tokens']} tokens "
              f"(dense {lat['dense_ms']:.4f} ms, speed-up {lat['speedup']:.3f}x)")  # fmt: skip
    print(f"wrote {result.output_dir}/plan.json, metrics.json, config.json")
    return 0


def _apply(args: argparse.Namespace) -> int:
    m = apply_plan(args.plan, args.output_dir, vars(args))
    print(f"compressed {m['model']} by {args.plan} with {m['backend']}: perplexity {m['perplexity']:.3f} "
          f"(dense {m['dense_perplexity']:.3f})")  # fmt: skip
    print(f"wrote {args.output_dir} (reload with AutoModelForCausalLM.from_pretrained)")
    return 0


def _export(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan)
    plan.check_budget(f"plan {args.plan}", args.allow_over_budget)
    here = Path(args.plan).parent
    check_output(args.output_dir or here / "exports" / args.to, "--output-dir")
    backend = run_config(Path(args.plan), {"backend": args.backend}).backend  # the run's, unless overridden
    for path in export(plan, args.to, args.output_dir or here / "exports" / args.to, backend):
        print(f"wrote {path}")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from allocator.compare import compare
    from allocator.data import default_evaluation

    if args.bootstrap < 1:
        raise AllocatorError(f"--bootstrap must be at least 1, got {args.bootstrap}")
    targets, methods = _parts(args.targets, ";"), _parts(args.methods, ",")
    texts = _parts(args.texts or args.eval or default_evaluation(), ",")
    command = shlex.join(["allocator", *sys.argv[1:]]) if sys.argv[1:2] == ["compare"] else "allocator compare"
    df = compare(_config(args), methods, targets, texts, args.output_dir, args.bootstrap, command)
    print(df[["target", "method", "text", "perplexity", "lo", "hi", "vs_uniform"]].round(3).to_string(index=False))
    print(f"wrote {args.output_dir}/compare.md, compare.csv and a plot per text")
    return 0


def _parts(text: str, sep: str) -> list[str]:
    return [part.strip() for part in text.split(sep) if part.strip()]


def _report(args: argparse.Namespace) -> int:
    print(f"wrote {write_run_report(args.folder)}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    grid = format_grid(args.levels, args.format)
    get_format(args.format).check_backend(args.backend)
    if args.output:
        check_output(args.output, "--output", folder=False)
    session = Session(_config(args))
    profile = artifacts.measure_profile(session, grid, args.backend, args.kl_pool, args.output)
    print(f"profile of {session.loaded.model_id}: {len(session.inventory.layers)} layers x {len(grid)} levels, "
          f"backend {args.backend}, {profile.meta['calibration_tokens']} calibration tokens")  # fmt: skip
    print("relative output error per level (mean / min / max over layers):")
    for level, row in profile.summary().iterrows():
        kl = f"  KL {row['kl']:.5f}" if "kl" in row else ""
        print(f"  {level:>14}  {row['mean']:.5f}  {row['min']:.5f}  {row['max']:.5f}{kl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
