"""AutoRound ``layer_config``: one entry per module, by exact name (exact names resolve first).

Unquantized layers get ``bits: 16`` (AutoRound keeps them in full precision). Research: ecosystem.md §2.7.
"""

from __future__ import annotations

import json
from collections import Counter

from allocator.errors import AllocatorError
from allocator.export.common import quant_setting, require_format, require_parts
from allocator.levels.ints import IntWeights
from allocator.plan import Plan

TAKES = (IntWeights,)


def export(plan: Plan, backend: str | None = None) -> dict[str, str]:
    """``layer_config.json`` (pass as ``AutoRound(model, layer_config=…)``) with the base scheme."""
    require_format(plan, "autoround", "AutoRound")
    require_parts(plan, TAKES, "AutoRound")
    settings = {name: quant_setting(lv) for name, lv in plan.assignment.items()}
    bad = [f"{name}={plan.assignment[name].name}" for name, (bits, _, sym) in settings.items() if bits == 8 and not sym]
    if bad:  # AutoRound raises ValueError on them
        raise AllocatorError(f"AutoRound has no asymmetric 8-bit weights: re-plan with --format autoround (w8 is "
                             f"symmetric); all {len(bad)} layers: {', '.join(bad)}")  # fmt: skip
    layer_config = {name: {"bits": bits, "group_size": group or -1, "sym": sym}
                    for name, (bits, group, sym) in settings.items()}  # fmt: skip
    common = Counter((bits, group or -1, sym) for bits, group, sym in settings.values() if bits < 16)
    base = common.most_common(1)[0][0] if common else (16, -1, True)
    payload = {"bits": base[0], "group_size": base[1], "sym": base[2], "layer_config": layer_config}
    return {"layer_config.json": json.dumps(payload, indent=2, allow_nan=False) + "\n"}
