"""AutoRound ``layer_config``: one entry per module, by exact name (exact names resolve first).

Unquantized layers get ``bits: 16`` (AutoRound keeps them in full precision). Research: ecosystem.md §2.7.
"""

from __future__ import annotations

import json
from collections import Counter

from allocator.errors import AllocatorError
from allocator.export.common import require_kinds, require_target
from allocator.plan import Plan

KINDS = {"dense", "bits"}


def export(plan: Plan, backend: str | None = None) -> dict[str, str]:
    """``layer_config.json`` (pass as ``AutoRound(model, layer_config=…)``) with the base scheme."""
    require_target(plan, "autoround", "AutoRound")
    require_kinds(plan, KINDS, "AutoRound")
    bad = [f"{name}={lv.name}" for name, lv in plan.assignment.items() if lv.quantized and not lv.sym and lv.bits == 8]
    if bad:  # AutoRound raises ValueError on them
        raise AllocatorError(f"AutoRound has no asymmetric 8-bit weights: re-plan with --format autoround (w8 is "
                             f"symmetric); all {len(bad)} layers: {', '.join(bad)}")  # fmt: skip
    layer_config = {name: {"bits": lv.bits, "group_size": lv.group_size or -1, "sym": lv.sym}
                    for name, lv in plan.assignment.items()}  # fmt: skip
    common = Counter((lv.bits, lv.group_size or -1, lv.sym) for lv in plan.assignment.values() if lv.quantized)
    base = common.most_common(1)[0][0] if common else (16, -1, True)
    payload = {"bits": base[0], "group_size": base[1], "sym": base[2], "layer_config": layer_config}
    return {"layer_config.json": json.dumps(payload, indent=2) + "\n"}
