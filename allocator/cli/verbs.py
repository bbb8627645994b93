"""The verbs of the command line: each turns its flags into settings, calls the API and prints what it did."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from allocator.apply import apply_plan, plan_config
from allocator.errors import AllocatorError
from allocator.export import export as write_export
from allocator.io import check_output
from allocator.pipeline import run as run_pipeline
from allocator.plan import Plan
from allocator.report import write_run_report
from allocator.search import option_fields
from allocator.session import Session
from allocator.spec import RunConfig, resolve
from allocator.tasks import primary


def config_of(args: argparse.Namespace, **extra) -> RunConfig:
    """The run settings the flags give (searcher options gathered into ``options``)."""
    names = set(RunConfig.__dataclass_fields__)
    given = vars(args)
    options = {name: given[name] for name in option_fields() if name in given}
    return RunConfig(**{**{k: v for k, v in given.items() if k in names}, "options": options, **extra})


def run(args: argparse.Namespace) -> int:
    """``allocator run``."""
    out = args.output_dir or f"runs/{args.method}-{args.target.replace('=', '').replace(',', '_')}"
    result = run_pipeline(resolve(config_of(args, output_dir=out)))
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
    for task, scores in m.get("tasks", {}).items():
        if (shown := primary(scores)) is not None:
            metric, v = shown
            print(f"{task:<22} {metric} {v['value']:.4f} [{v['lo']:.4f}, {v['hi']:.4f}] on {scores['items']} items")
    print(f"wrote {result.output_dir}/plan.json, metrics.json, config.json")
    return 0


def apply(args: argparse.Namespace) -> int:
    """``allocator apply``."""
    m = apply_plan(args.plan, args.output_dir, vars(args), args.checkpoint)
    size = m["size"]
    print(f"compressed {m['model']} by {args.plan} with {m['backend']}: perplexity {m['perplexity']:.3f} "
          f"(dense {m['dense_perplexity']:.3f})")  # fmt: skip
    print(f"wrote a {m['checkpoint']} checkpoint to {args.output_dir}: compressed layers {size['written_bytes']:.0f} "
          f"bytes ({size['written_over_planned']:.3f}x the plan's {size['planned_bytes']:.0f}; per layer in "
          "allocator_metrics.json)")  # fmt: skip
    return 0


def export(args: argparse.Namespace) -> int:
    """``allocator export``."""
    plan = Plan.load(args.plan)
    plan.check_budget(f"plan {args.plan}", args.allow_over_budget)
    out = args.output_dir or Path(args.plan).parent / "exports" / args.to
    base = None if args.output_dir else Path(args.plan).parent  # the plan's folder may be someone else's
    check_output(out, "--output-dir")
    backend = plan_config(Path(args.plan), plan, {"backend": args.backend}).backend  # the plan's, unless overridden
    for path in write_export(plan, args.to, out, backend, base):
        print(f"wrote {path}")
    return 0


def compare(args: argparse.Namespace) -> int:
    """``allocator compare``."""
    import pandas as pd

    from allocator.compare import compare as run_compare
    from allocator.data import default_evaluation

    if args.bootstrap < 1:
        raise AllocatorError(f"--bootstrap must be at least 1, got {args.bootstrap}")
    targets, methods = _parts(args.targets, ";"), _parts(args.methods, ",")
    texts = _parts(args.texts or args.eval or default_evaluation(), ",")
    command = shlex.join(["allocator", *sys.argv[1:]]) if sys.argv[1:2] == ["compare"] else "allocator compare"
    df = run_compare(config_of(args), methods, targets, texts, args.output_dir, args.bootstrap, command)
    shown = df[["target", "method", "text", "perplexity", "lo", "hi", "vs_uniform", "ratio_lo", "ratio_hi", "wall_s"]]
    print(shown.assign(text=[Path(t).name for t in df.text]).round(3).to_string(index=False))
    tasks = Path(args.output_dir) / "tasks.csv"
    if args.tasks and tasks.is_file():
        scores = pd.read_csv(tasks)
        print(scores[scores.primary][["target", "method", "task", "metric", "value", "lo", "hi", "dense"]]
              .round(4).to_string(index=False))  # fmt: skip
    print(f"wrote {args.output_dir}/compare.md, compare.csv{', tasks.csv' if args.tasks else ''} and a plot per text")
    return 0


def _parts(text: str, sep: str) -> list[str]:
    return [part.strip() for part in text.split(sep) if part.strip()]


def report(args: argparse.Namespace) -> int:
    """``allocator report``."""
    print(f"wrote {write_run_report(args.folder)}")
    return 0


def profile(args: argparse.Namespace) -> int:
    """``allocator profile``: the cached profile (measured if new), with a ``kl`` column on ``--kl-pool`` windows."""
    if args.kl_pool < 0:
        raise AllocatorError(f"--kl-pool must be >= 0 windows, got {args.kl_pool}")
    if args.output:
        check_output(args.output, "--output", folder=False)
    spec = resolve(config_of(args))
    grid, backend = list(spec.grid), spec.backend.name
    session = Session(spec.config)
    found = session.profile(grid, backend, with_database=bool(args.kl_pool))
    if args.kl_pool:
        session.workspace.add_kl(session.calibration(), found, grid, backend, args.kl_pool, again=True)
    if args.output:
        found.save(args.output)
    print(f"profile of {session.loaded.model_id}: {len(session.inventory.layers)} layers x {len(grid)} levels, "
          f"backend {backend}, {found.meta['calibration_tokens']} calibration tokens")  # fmt: skip
    print("relative output error per level (mean / min / max over layers):")
    for level, row in found.summary().iterrows():
        kl = f"  KL {row['kl']:.5f}" if "kl" in row else ""
        print(f"  {level:>14}  {row['mean']:.5f}  {row['min']:.5f}  {row['max']:.5f}{kl}")
    return 0
