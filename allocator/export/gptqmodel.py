"""GPTQModel ``QuantizeConfig`` with a ``dynamic`` per-module override dict.

The base bits/group size/symmetry are the plan's most common quantized setting; every layer
that differs gets ``"+:REGEX": {bits, group_size, sym}``, every unquantized one ``"-:REGEX": {}``.
Patterns are escaped, anchored and also match vLLM's fused names, because vLLM applies them to
``…qkv_proj`` / ``…gate_up_proj`` (first match wins, ``re.match``). Research: ecosystem.md §2.5.
"""

from __future__ import annotations

import json
from collections import Counter

from allocator.errors import AllocatorError
from allocator.export.common import anchored, quant_setting, require_format, require_parts, require_tied
from allocator.levels.ints import IntWeights
from allocator.plan import Plan

TAKES = (IntWeights,)
BITS = {2, 3, 4, 8}  # what GPTQ kernels (and vLLM's GPTQ loaders) run


def export(plan: Plan, backend: str | None = None) -> dict[str, str]:
    """``quantize_config.json``: pass its fields to ``QuantizeConfig(**…)``."""
    require_format(plan, "gptqmodel", "GPTQModel")
    require_parts(plan, TAKES, "GPTQModel")
    odd = sorted({lv.name for lv in plan.assignment.values() if lv.quantized and quant_setting(lv)[0] not in BITS})
    if odd:
        raise AllocatorError(f"GPTQModel runs {sorted(BITS)}-bit weights, not {odd}: re-plan with those bit-widths")
    require_tied(plan, quant_setting, "GPTQModel")
    settings = Counter(quant_setting(lv) for lv in plan.assignment.values() if lv.quantized)
    if not settings:
        raise AllocatorError("the plan quantizes no layer: there is nothing for GPTQModel to do")
    (bits, group, sym), _ = settings.most_common(1)[0]
    dynamic: dict[str, dict] = {}
    for name, level in plan.assignment.items():
        key = anchored(name)
        if not level.quantized:
            dynamic.setdefault(f"-:{key}", {})
        elif quant_setting(level) != (bits, group, sym):
            b, g, s = quant_setting(level)
            dynamic.setdefault(f"+:{key}", {"bits": b, "group_size": g or -1, "sym": s})
    config = {"bits": bits, "group_size": group or -1, "sym": sym, "desc_act": False, "dynamic": dynamic}
    return {"quantize_config.json": json.dumps(config, indent=2, allow_nan=False) + "\n"}
