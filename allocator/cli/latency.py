"""``allocator latency measure | predict | check``: tables on the target GPU, plans against them."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
import torch

from allocator.errors import AllocatorError
from allocator.inventory import Inventory
from allocator.io import check_output, write_text_atomic
from allocator.latency.architectures import PRESETS, config_for, meta_model, random_model
from allocator.latency.kernels import ALL_KERNELS
from allocator.latency.measure import (
    DECODE_TOKENS,
    PREFILL_TOKENS,
    Timer,
    check_plans,
    environment,
    measure_table,
)
from allocator.latency.table import LatencyTable, slug
from allocator.model import DTYPES
from allocator.plan import Plan


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write token counts like 1,16,2048") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: token counts must be positive integers")
    return values


def add_parser(sub) -> None:
    """The ``latency`` verb and its three sub-verbs."""
    lat = sub.add_parser("latency", help="latency tables measured on the target GPU; predict and check plans")
    verbs = lat.add_subparsers(dest="latency_command", required=True)
    m = verbs.add_parser("measure", help="time every layer shape x kernel x token count, and the overhead")
    shapes = f"preset ({', '.join(PRESETS)}), .gguf, folder or hub id (only its config is read)"
    m.add_argument("--model", default="smollm2-135m", help=shapes)
    m.add_argument("--tokens", type=_ints, default=DECODE_TOKENS + PREFILL_TOKENS, help="token counts, e.g. 1,16,2048")
    m.add_argument("--kernels", default=",".join(ALL_KERNELS), help="kernels to time (dense is always timed)")
    m.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    m.add_argument("--device", default="cuda")
    m.add_argument("--repeats", type=int, default=30, help="timed repeats per cell (median)")
    m.add_argument("--out", default="profiles/latency", help="tables go to OUT/<gpu>/<model>.csv")
    verbs_help = {"predict": "predicted end-to-end latency of a plan",
                  "check": "build the plan's model (random weights), time it, compare with the prediction"}  # fmt: skip
    for verb, what in verbs_help.items():
        p = verbs.add_parser(verb, help=what)
        p.add_argument("plan", help="plan.json")
        p.add_argument("--table", required=True, help="a table from `allocator latency measure`")
        p.add_argument("--tokens", type=_ints, default=(1,), help="token counts, e.g. 1,2048")
        p.add_argument("--model", default=None, help="shapes to build (default: the table's model)")
        if verb == "check":
            p.add_argument("--device", default="cuda")
            p.add_argument("--repeats", type=int, default=30)
            p.add_argument("--out", default=None, help="a CSV the rows are added to (one per plan and token count)")


def run(args: argparse.Namespace) -> int:
    """Dispatch a ``latency`` sub-verb; returns the exit code."""
    return {"measure": _measure, "predict": _predict, "check": _check}[args.latency_command](args)


def _positive(args: argparse.Namespace) -> None:
    if args.repeats < 1:
        raise AllocatorError(f"--repeats must be at least 1, got {args.repeats}")


def _cuda_or_refuse(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AllocatorError("no CUDA GPU here: run this on the target GPU (or pass --device cpu for a dry run)")


def _measure(args: argparse.Namespace) -> int:
    _cuda_or_refuse(args.device)
    _positive(args)
    check_output(args.out, "--out")
    kernels = tuple(dict.fromkeys(["dense", *(k.strip() for k in args.kernels.split(",") if k.strip())]))
    unknown = sorted(set(kernels) - set(ALL_KERNELS))
    if unknown:
        raise AllocatorError(f"unknown kernels {unknown}: choose from {', '.join(ALL_KERNELS)}")
    config = config_for(args.model)
    model = random_model(config, DTYPES[args.dtype], args.device)
    inventory = Inventory.from_model(model)
    env = environment(args.device)
    timer = Timer(args.device, repeats=args.repeats)
    table = measure_table(model, inventory, args.tokens, kernels, timer, env,
                          meta={"model": args.model, "fingerprint": inventory.fingerprint})  # fmt: skip
    path = (
        Path(args.out)
        / slug(env["gpu"])
        / f"{slug(Path(args.model).stem if args.model.endswith('.gguf') else args.model)}.csv"
    )
    table.save(path)
    over = table.df[table.df.kind == "overhead"]
    print(f"{env['gpu']} (driver {env['driver']}, torch {env['torch']}): {len(table.shapes())} layer shapes x "
          f"{len(kernels)} kernels x {len(args.tokens)} token counts")  # fmt: skip
    for m, serving in zip(over.tokens, over.serving, strict=True):
        print(f"  {m:>5} tokens: {serving}")
    print(f"wrote {path} and {path.with_suffix('.json')}")
    return 0


def _plan_and_model(args: argparse.Namespace) -> tuple[Plan, LatencyTable, str]:
    table = LatencyTable.load(args.table)
    plan = Plan.load(args.plan)
    spec = args.model or table.meta.get("model") or plan.model_id
    return plan, table, spec


def _predict(args: argparse.Namespace) -> int:
    plan, table, spec = _plan_and_model(args)
    inventory = Inventory.from_model(meta_model(config_for(spec)))
    plan.check_against(inventory)
    print(f"plan {args.plan} ({plan.method}, {plan.budget}) on {table.meta.get('gpu', table.source)}")
    for m in args.tokens:
        p = table.predict(plan.assignment, inventory, m)
        print(f"  {m:>5} tokens: predicted {p['predicted_ms']:.4f} ms  (dense {p['dense_ms']:.4f} ms, "
              f"speed-up {p['speedup']:.3f}x; linear layers {p['linear_ms']:.4f} ms)")  # fmt: skip
    return 0


def _check(args: argparse.Namespace) -> int:
    _cuda_or_refuse(args.device)
    _positive(args)
    before = _earlier_rows(args.out) if args.out else None  # read first: a bad file costs no measurement
    plan, table, spec = _plan_and_model(args)
    dtype = DTYPES.get(table.meta.get("dtype", "bfloat16"), torch.bfloat16)
    model = random_model(config_for(spec), dtype, args.device)
    inventory = Inventory.from_model(model)
    plan.check_against(inventory)
    rows = check_plans(model, inventory, table, {"plan": plan.assignment}, args.tokens,
                       Timer(args.device, repeats=args.repeats))  # fmt: skip
    for r in rows:
        print(f"  {r['tokens']:>5} tokens: predicted {r['predicted_ms']:.4f} ms  measured {r['measured_ms']:.4f} ms  "
              f"error {r['error_pct']:+.2f} %  speed-up measured {r['measured_speedup']:.3f}x")  # fmt: skip
    if before is not None:  # rewritten whole (atomically): a check of many plans gathers its rows in one CSV
        new = pd.DataFrame([{**r, "plan": args.plan, "gpu": table.meta.get("gpu", "")} for r in rows])
        write_text_atomic(args.out, pd.concat([before, new], ignore_index=True).to_csv(index=False))
        print(f"added {len(rows)} rows to {args.out}")
    return 0


def _earlier_rows(out: str) -> pd.DataFrame:
    """The rows a CSV at ``out`` holds already (none if it is new), refused in one line if it is not one."""
    check_output(out, "--out", folder=False)
    path = Path(out)
    if not path.is_file() or not path.stat().st_size:
        return pd.DataFrame()
    try:
        before = pd.read_csv(path)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise AllocatorError(f"--out {out!r} is not a CSV this check can add to ({exc}): pass another file") from None
    if not {"plan", "tokens", "measured_ms"} <= set(before.columns):
        raise AllocatorError(f"--out {out!r} holds no `latency check` rows: pass another file")
    return before
