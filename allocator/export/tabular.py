"""The plan itself: JSON (the versioned plan file) and CSV (one row per layer), for any other tool."""

from __future__ import annotations

import io
import json

import pandas as pd

from allocator.formats import storage_bits
from allocator.plan import Plan
from allocator.untrusted import cell


def to_json(plan: Plan) -> dict[str, str]:
    """``plan.json``: loads back with ``Plan.load``."""
    return {"plan.json": json.dumps(plan.to_dict(), indent=2, allow_nan=False) + "\n"}


def to_csv(plan: Plan) -> dict[str, str]:
    """``plan.csv``: layer, shape, level and its parts by slot, sparsity and stored bits, in the model's layer order."""
    rows = []
    for name, level in plan.assignment.items():
        r, c = plan.shapes[name]
        parts = {slot: getattr(level, slot) for slot in ("prune", "weights", "acts")}
        rows.append({"layer": cell(name), "rows": r, "cols": c, "level": level.name, "format": level.format,
                     **{slot: part.name if part is not None else "" for slot, part in parts.items()},
                     "drop": level.drop, "sparsity": level.sparsity,
                     "bits_per_weight": storage_bits(level, r, c) / (r * c)})  # fmt: skip
    buf = io.StringIO()
    pd.DataFrame(rows).to_csv(buf, index=False)  # pandas quotes commas, quotes and newlines (csv module rules)
    return {"plan.csv": buf.getvalue()}
