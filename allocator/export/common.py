"""What every exporter shares: checks of the part kinds it takes, tie groups, anchored name patterns.

Plans are keyed by Hugging Face module names (``named_modules()``); each exporter derives its
target's names from them. Patterns are always escaped and anchored, so ``layers.1.`` can never
match ``layers.10.`` (a pitfall of substring matching in several toolkits).
"""

from __future__ import annotations

import re
from collections import defaultdict

from allocator.errors import AllocatorError
from allocator.formats import FORMATS
from allocator.inventory import TIE_KINDS
from allocator.levels import Level, Part
from allocator.levels.ints import IntWeights
from allocator.plan import Plan

# serving engines (vLLM) fuse these shards into one kernel: they must share one setting
FUSED = {role: f"{kind}_proj" for role, kind in TIE_KINDS.items()}


def require_parts(plan: Plan, takes: tuple[type[Part], ...], target: str) -> None:
    """Refuse a plan with a level holding a part kind ``target`` does not take, naming every such layer."""
    layers = [f"{n}={lv.name}" for n, lv in plan.assignment.items() if any(not isinstance(p, takes) for p in lv.parts)]
    if layers:
        bad = sorted({entry.rpartition("=")[2] for entry in layers})
        kinds = ", ".join(cls.kind for cls in takes)
        raise AllocatorError(
            f"{target} cannot express levels {bad} (it takes dense and {kinds} levels): "
            f"re-plan with a grid of those, or export to json/csv; all {len(layers)} layers: {', '.join(layers)}"
        )


def require_format(plan: Plan, format: str, target: str) -> None:
    """Refuse a plan made for another deployment format (``--format``), naming every layer it would change."""
    layers = [f"{name}={lv.name}" for name, lv in plan.assignment.items() if lv.format and lv.format != format]
    if layers:
        made = sorted({lv.format for lv in plan.assignment.values() if lv.format and lv.format != format})
        writers = ", ".join(f"--to {FORMATS[t].exporter}" for t in made)
        raise AllocatorError(
            f"the plan was made for {', '.join(made)} (--format), not for {target}: export it with {writers}, or "
            f"re-plan with --format {format}; all {len(layers)} layers: {', '.join(layers)}"
        )


def unservable(plan: Plan, format: str) -> list[str]:
    """Layers of a generic plan (no ``--format``) whose level ``format`` cannot store or run, each with why."""
    chosen = FORMATS[format]

    def why(name: str, level: Level) -> str | None:
        return chosen.reason(level) or chosen.unfit(level, *plan.shapes[name])

    return [f"{name}={lv.name} ({w})" for name, lv in plan.assignment.items() if not lv.format and (w := why(name, lv))]


def require_tied(plan: Plan, setting, target: str) -> None:
    """Refuse a plan giving one fused group (q/k/v, gate/up of a block) different settings."""
    groups: dict[str, set] = defaultdict(set)
    for name, level in plan.assignment.items():
        parent, _, leaf = name.rpartition(".")
        if leaf in FUSED:
            groups[f"{parent}.{FUSED[leaf]}"].add(setting(level))
    split = sorted(g for g, settings in groups.items() if len(settings) > 1)
    if split:
        raise AllocatorError(
            f"{target} is loaded by vLLM, which fuses q/k/v and gate/up and needs one setting per fused "
            f"layer: re-plan with --per tie-group; the plan splits all of {split}"
        )


def anchored(name: str) -> str:
    """An anchored regex for one module that also matches its fused vLLM name (``…qkv_proj``)."""
    parent, _, leaf = name.rpartition(".")
    if leaf in FUSED:
        return f"^{re.escape(parent)}\\.({leaf.removesuffix('_proj')}|{FUSED[leaf].removesuffix('_proj')})_proj$"
    return f"^{re.escape(name)}$"


def quant_setting(level: Level) -> tuple[int, int, bool]:
    """(bits, group_size, sym) of an integer-weight level ((16, 0, True): not quantized)."""
    w = level.weights
    return (w.bits, w.group, w.sym) if isinstance(w, IntWeights) else (16, 0, True)
