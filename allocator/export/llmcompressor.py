"""llm-compressor recipe (YAML): pruning as ``sparsity`` lists, quantization as ``config_groups``.

Pruning (SparseGPT/Wanda modifiers): per-layer values only exist in the list form, aligned to the
``named_modules()`` order of the matched ``targets`` (the dict form is gone since 0.13); one
modifier group per mask structure (unstructured ``0:0``, each ``N:M``). Quantization
(GPTQModifier): one config group per (bits, group size, symmetry), targets as anchored ``re:``
patterns that also match vLLM's fused ``qkv_proj`` / ``gate_up_proj``; unquantized layers and the
LM head go to ``ignore``. Research: ../shared/research/ecosystem.md §2.1-2.2.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import yaml

from allocator.export.common import anchored, quant_setting, require_format, require_parts, require_tied, unservable
from allocator.levels.ints import IntWeights
from allocator.levels.pruning import NM, Sparsity
from allocator.plan import Plan

TAKES = (Sparsity, NM, IntWeights)
log = logging.getLogger(__name__)
PRUNERS = {"wanda": "WandaPruningModifier"}  # every other backend: SparseGPT (the OBS pruner)


def export(plan: Plan, backend: str | None = None) -> dict[str, str]:
    """``recipe.yaml`` with a sparsity stage and/or a quantization stage."""
    require_format(plan, "vllm", "llm-compressor (vLLM)")
    require_parts(plan, TAKES, "llm-compressor")
    if bad := unservable(plan, "vllm"):  # llm-compressor makes them, but vLLM will not load or speed them up
        log.warning("vLLM cannot serve %d layers of this plan as planned (re-plan with --format vllm): %s",
                    len(bad), ", ".join(bad))  # fmt: skip
    recipe: dict = {}
    pruner = PRUNERS.get(backend or "", "SparseGPTModifier")
    by_structure: dict[str, list[tuple[str, float]]] = defaultdict(list)
    for name, level in plan.assignment.items():  # plan order is named_modules() order
        nm = level.prune.nm if level.prune is not None else None
        if nm:
            by_structure[f"{nm[0]}:{nm[1]}"].append((name, 1 - nm[0] / nm[1]))
        elif level.sparsity > 0:
            by_structure["0:0"].append((name, level.sparsity))
    if by_structure:
        stage = {}
        for structure, members in by_structure.items():
            key = "unstructured" if structure == "0:0" else f"nm_{structure.replace(':', '_')}"
            stage[f"{key}_modifiers"] = {pruner: {
                "targets": [name for name, _ in members],
                "sparsity": [round(float(s), 6) for _, s in members],
                "mask_structure": structure,
                "ignore": ["re:.*lm_head"],
            }}  # fmt: skip
        recipe["sparsity_stage"] = stage
    quantized = {n: lv for n, lv in plan.assignment.items() if lv.quantized}
    if quantized:
        require_tied(plan, quant_setting, "an llm-compressor quantization recipe")
        groups: dict[tuple, list[str]] = defaultdict(list)
        for name, level in quantized.items():
            pattern = f"re:{anchored(name)}"
            if pattern not in groups[quant_setting(level)]:
                groups[quant_setting(level)].append(pattern)
        config_groups = {}
        for i, ((bits, group, sym), targets) in enumerate(groups.items()):
            weights = {"num_bits": bits, "type": "int", "symmetric": sym, "dynamic": False,
                       "strategy": "group" if group else "channel"}  # fmt: skip
            if group:
                weights["group_size"] = group
            config_groups[f"group_{i}"] = {"targets": targets, "weights": weights}
        ignore = sorted({f"re:{anchored(n)}" for n, lv in plan.assignment.items() if not lv.quantized})
        recipe["quant_stage"] = {"quant_modifiers": {"GPTQModifier": {
            "ignore": ["lm_head", *ignore], "config_groups": config_groups}}}  # fmt: skip
    made = {"made_by": "allocator", "method": plan.method, "budget": str(plan.budget), "model": plan.model_id}
    head = yaml.safe_dump(made, sort_keys=False, width=1000)  # provenance as data: the serialiser quotes it
    return {"recipe.yaml": "# llm-compressor recipe from an allocator plan:\n" + "".join(f"#   {line}\n" for line in
            head.splitlines()) + yaml.safe_dump(recipe, sort_keys=False, width=1000)}  # fmt: skip
