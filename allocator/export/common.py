"""What every exporter shares: level-type checks, tie groups, anchored name patterns.

Plans are keyed by Hugging Face module names (``named_modules()``); each exporter derives its
target's names from them. Patterns are always escaped and anchored, so ``layers.1.`` can never
match ``layers.10.`` (a pitfall of substring matching in several toolkits).
"""

from __future__ import annotations

import re
from collections import defaultdict

from allocator.errors import AllocatorError
from allocator.levels import Level
from allocator.model import TIE_KINDS
from allocator.plan import Plan

# serving engines (vLLM) fuse these shards into one kernel: they must share one setting
FUSED = {role: f"{kind}_proj" for role, kind in TIE_KINDS.items()}


def require_kinds(plan: Plan, allowed: set[str], target: str) -> None:
    """Refuse a plan using level types ``target`` cannot express, naming them and what it can."""
    layers = [f"{name}={lv.name}" for name, lv in plan.assignment.items() if lv.kind not in allowed]
    if layers:
        bad = sorted({entry.rpartition("=")[2] for entry in layers})
        raise AllocatorError(
            f"{target} cannot express levels {bad} (it takes {', '.join(sorted(allowed))} levels): "
            f"re-plan with a grid of those, or export to json/csv; all {len(layers)} layers: {', '.join(layers)}"
        )


def require_target(plan: Plan, target: str, fmt: str) -> None:
    """Refuse a plan made for another deployment target (``--format``), naming every layer it would change."""
    from allocator.targets import TARGETS

    layers = [f"{name}={lv.name}" for name, lv in plan.assignment.items() if lv.target and lv.target != target]
    if layers:
        made = sorted({lv.target for lv in plan.assignment.values() if lv.target and lv.target != target})
        writers = ", ".join(f"--to {TARGETS[t].exporter}" for t in made)
        raise AllocatorError(
            f"the plan was made for {', '.join(made)} (--format), not for {fmt}: export it with {writers}, or "
            f"re-plan with --format {target}; all {len(layers)} layers: {', '.join(layers)}"
        )


def unservable(plan: Plan, target: str) -> list[str]:
    """Layers of a generic plan (no ``--format``) whose level ``target`` cannot store or run, each with why."""
    from allocator.targets import TARGETS

    chosen = TARGETS[target]

    def why(name: str, level: Level) -> str | None:
        return chosen.reason(level) or chosen.unfit(level, *plan.shapes[name])

    return [f"{name}={lv.name} ({w})" for name, lv in plan.assignment.items() if not lv.target and (w := why(name, lv))]


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
    """(bits, group_size, sym) of a level (16 bits: not quantized)."""
    return (level.bits, level.group_size, level.sym)
