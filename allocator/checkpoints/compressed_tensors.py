"""compressed-tensors checkpoints: the folder vLLM and SGLang load, holding allocator's own weights bit for bit.

Each distinct scheme of the plan is one ``config_group`` (``group_0``, ``group_1``, …: plain names, since suffixed
names made vLLM mismatch layers in an llm-compressor PR), whose targets are anchored regexes that also match
vLLM's fused ``qkv_proj`` / ``gate_up_proj``; unquantized linears (dense, pruned, dropped) and the LM head are in
``ignore``. A quantized layer's tensors are allocator's own codes and scales (from the level database or recorded
by the backend), packed as compressed-tensors packs them, so its decompression gives exactly the weights allocator
measured: nothing is quantized again. compressed-tensors has no sparse compressor (0.19/0.20: the bitmask and 2:4
formats are legacy, without a compressor), so pruned layers are stored dense, zeros included. What each weight kind
stores is declared in :data:`SCHEMES` (research: /tmp notes in the closing note of issue 29).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from allocator.checkpoints.packing import pack_int32
from allocator.errors import AllocatorError
from allocator.export.common import anchored, require_parts, require_tied
from allocator.formats import storage_bits
from allocator.levels import Level
from allocator.levels.ints import IntWeights
from allocator.levels.pruning import NM, Drop, Sparsity
from allocator.plan import Plan

SHARD_BYTES = 4 * 2**30  # safetensors files of at most 4 GiB, as transformers shards


def _int_args(w: IntWeights) -> dict:
    args = {"num_bits": w.bits, "type": "int", "symmetric": w.sym, "dynamic": False,
            "strategy": "group" if w.group else "channel", "group_size": w.group or None}  # fmt: skip
    return {**args, "zp_dtype": None if w.sym else "torch.int8"}


def _int_tensors(w: IntWeights, codes: torch.Tensor, params: tuple, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """pack-quantized: codes offset-binary in little-end-first int32 words, scales in the model dtype, zero points
    (asymmetric) packed along the output dimension."""
    scale, zero = params
    rows, cols = codes.shape
    out = {"weight_packed": pack_int32(codes, w.bits), "weight_scale": scale.to(dtype).contiguous(),
           "weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}  # fmt: skip
    if not w.sym:
        out["weight_zero_point"] = pack_int32(zero.t().round().to(torch.uint8), w.bits).t().contiguous()
    return out


# weight kind -> (its QuantizationArgs, the checkpoint format name, its tensors)
SCHEMES: dict[type, tuple[Callable, Callable, Callable]] = {
    IntWeights: (_int_args, lambda w, acts: "pack-quantized", _int_tensors),
}
TAKES = (Sparsity, NM, Drop, IntWeights)


def scheme_of(level: Level) -> tuple[str, str] | None:
    """The (weights args, format) of a quantized level as JSON text (None: stored unquantized)."""
    if level.weights is None:
        return None
    args, fmt, _ = SCHEMES[type(level.weights)]
    return json.dumps(args(level.weights), sort_keys=True), fmt(level.weights, level.acts)


def quantization_config(plan: Plan) -> dict:
    """config.json's ``quantization_config``: one config group per distinct scheme, anchored targets, ignore."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name, level in plan.assignment.items():
        key = scheme_of(level)
        if key is not None and (pattern := f"re:{anchored(name)}") not in groups.setdefault(key, []):
            groups[key].append(pattern)
    ignore = sorted({f"re:{anchored(n)}" for n, lv in plan.assignment.items() if lv.weights is None})
    config_groups = {f"group_{i}": {"targets": targets, "weights": json.loads(args), "input_activations": None,
                                    "output_activations": None, "format": fmt}
                     for i, ((args, fmt), targets) in enumerate(groups.items())}  # fmt: skip
    formats = {fmt for _, fmt in groups}
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": ["lm_head", *ignore],
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
            "transform_config": {}}  # fmt: skip


def check(plan: Plan) -> None:
    """Refuse, naming every layer, what this format cannot hold or vLLM cannot load (split fused groups)."""
    require_parts(plan, TAKES, "a compressed-tensors checkpoint")
    require_tied(plan, scheme_of, "a compressed-tensors checkpoint")


def write(folder: Path, model: nn.Module, tokenizer, plan: Plan, grids: dict[str, tuple[torch.Tensor, tuple]]) -> dict:
    """Write the checkpoint of ``model`` (compressed to ``plan``) into ``folder``; ``grids`` holds each quantized
    layer's codes and scale parameters. Returns the size report (planned and written bytes per layer)."""
    check(plan)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    dtype = next(model.parameters()).dtype
    written: dict[str, int] = {}
    for name, level in plan.assignment.items():
        if level.weights is None:
            written[name] = state[f"{name}.weight"].numel() * state[f"{name}.weight"].element_size()
            continue
        if name not in grids:
            raise AllocatorError(f"no codes and scales for {name}: apply the plan with a backend that records them")
        codes, params = grids[name]
        tensors = SCHEMES[type(level.weights)][2](level.weights, codes, params, dtype)
        del state[f"{name}.weight"]
        state.update({f"{name}.{k}": v.cpu() for k, v in tensors.items()})
        written[name] = sum(t.numel() * t.element_size() for t in tensors.values() if t.dtype != torch.int64)
    _save_sharded(folder, state)
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(plan)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return size_report(plan, written)


def size_report(plan: Plan, written: dict[str, int]) -> dict:
    """Planned bytes (as the plan prices each layer) beside the bytes written for it, per layer and in total."""
    layers = {n: {"level": lv.name, "planned_bytes": storage_bits(lv, *plan.shapes[n]) / 8, "written_bytes": written[n]}
              for n, lv in plan.assignment.items()}  # fmt: skip
    planned, total = sum(v["planned_bytes"] for v in layers.values()), sum(written.values())
    return {"planned_bytes": planned, "written_bytes": total, "written_over_planned": total / planned, "layers": layers}


def _save_sharded(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards and their index past SHARD_BYTES."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
        return
    index = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, folder / file, metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index}, indent=2) + "\n"
    )
