"""The plan itself: JSON (the versioned plan file) and CSV (one row per layer), for any other tool."""

from __future__ import annotations

import io
import json

import pandas as pd

from allocator.plan import Plan

KINDS = {"dense", "sparsity", "nm", "bits", "sparse+bits", "drop"}  # every level type


def to_json(plan: Plan) -> dict[str, str]:
    """``plan.json``: loads back with ``Plan.load``."""
    return {"plan.json": json.dumps(plan.to_dict(), indent=2) + "\n"}


def to_csv(plan: Plan) -> dict[str, str]:
    """``plan.csv``: layer, shape and every level field, in the model's layer order."""
    rows = []
    for name, level in plan.assignment.items():
        r, c = plan.shapes[name]
        rows.append({"layer": name, "rows": r, "cols": c, "level": level.name, "kind": level.kind,
                     "sparsity": level.sparsity, "n": level.n, "m": level.m, "bits": level.bits,
                     "group_size": level.group_size, "sym": level.sym, "drop": level.drop})  # fmt: skip
    buf = io.StringIO()
    pd.DataFrame(rows).to_csv(buf, index=False)
    return {"plan.csv": buf.getvalue()}
