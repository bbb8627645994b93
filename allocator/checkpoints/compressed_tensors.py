"""compressed-tensors checkpoints: the folder vLLM and SGLang load, holding allocator's own weights bit for bit.

Each distinct scheme of the plan is one ``config_group`` (``group_0``, ``group_1``, …: plain names, since suffixed
names made vLLM mismatch layers in an llm-compressor PR), whose targets are anchored regexes that also match
vLLM's fused ``qkv_proj`` / ``gate_up_proj``; unquantized linears (dense, pruned, dropped) and the LM head are in
``ignore``. A quantized layer's tensors are allocator's own codes and scales (from the level database or recorded
by the backend), packed as compressed-tensors packs them, so its decompression gives exactly the weights allocator
measured: nothing is quantized again. compressed-tensors has no sparse compressor (0.19/0.20: the bitmask and 2:4
formats are legacy, without a compressor), so pruned layers are stored dense, zeros included. Int weights are
``pack-quantized`` (``int-quantized`` beside activation quantization), FP8 ``float-quantized``, NVFP4/MXFP4
``nvfp4-``/``mxfp4-pack-quantized``, MXFP8 ``mxfp8-quantized``, each with compressed-tensors' preset fields.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from allocator.checkpoints.packing import pack_int32
from allocator.errors import AllocatorError
from allocator.export.common import anchored, require_parts, require_tied
from allocator.formats import storage_bits
from allocator.levels import Level
from allocator.levels.acts import FP8Acts, Int8Acts, NVFP4Acts
from allocator.levels.floats import FP8, MXFP8
from allocator.levels.fp4 import MXFP4, NVFP4
from allocator.levels.ints import IntWeights
from allocator.levels.numerics import global_scale, mx_exponent
from allocator.levels.pruning import NM, Drop, Sparsity
from allocator.plan import Plan

SHARD_BYTES = 4 * 2**30  # safetensors files of at most 4 GiB, as transformers shards


_INT = {"type": "int", "symmetric": True, "dynamic": False}
_FLOAT = {"type": "float", "symmetric": True, "dynamic": False}
ACTS = {  # input activation args by activation kind, as compressed-tensors' presets write them
    Int8Acts: {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True},
    FP8Acts: {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True},
    NVFP4Acts: {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 16, "strategy": "tensor_group",
                "dynamic": "local", "scale_dtype": "torch.float8_e4m3fn"},
}  # fmt: skip


def weight_args(w) -> dict:
    """The weights' QuantizationArgs of a weight format (compressed-tensors' preset fields)."""
    if isinstance(w, IntWeights):
        grouping = {"strategy": "group", "group_size": w.group} if w.group else {"strategy": "channel"}
        return {**_INT, "num_bits": w.bits, "symmetric": w.sym, **grouping, "zp_dtype": None if w.sym else "torch.int8"}
    if isinstance(w, FP8):
        return {**_FLOAT, "num_bits": 8, "strategy": "tensor" if w.per_tensor else "channel"}
    if isinstance(w, NVFP4):
        return {**_FLOAT, "num_bits": 4, "group_size": 16, "strategy": "tensor_group",
                "scale_dtype": "torch.float8_e4m3fn"}  # fmt: skip
    return {**_FLOAT, "num_bits": 8 if isinstance(w, MXFP8) else 4, "group_size": 32, "strategy": "group",
            "scale_dtype": "torch.uint8"}  # fmt: skip


def checkpoint_format(level: Level) -> str:
    """compressed-tensors' format of a level's group (its compressor: the first of its priority list that fits)."""
    w = level.weights
    if isinstance(w, IntWeights):
        return "int-quantized" if level.acts is not None else "pack-quantized"
    if isinstance(w, NVFP4):
        return "nvfp4-pack-quantized"
    if isinstance(w, MXFP4):
        return "mxfp4-pack-quantized"
    return "mxfp8-quantized" if isinstance(w, MXFP8) else "float-quantized"


def _nibbles(codes: torch.Tensor) -> torch.Tensor:
    """FP4 codes two to a byte, the even column in the low nibble (CT's ``pack_fp4_to_uint8``)."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def layer_tensors(level: Level, codes: torch.Tensor, params: tuple, dtype: torch.dtype,
                  input_absmax: torch.Tensor | None) -> dict[str, torch.Tensor]:  # fmt: skip
    """What compressed-tensors stores for one layer (beside ``weight_shape``): codes packed its way, scales."""
    w = level.weights
    if isinstance(w, IntWeights):
        scale, zero = params
        out = {"weight_scale": scale.to(dtype).contiguous()}
        if level.acts is not None:  # int-quantized: signed codes as int8, unpacked
            out["weight"] = (codes.to(torch.int16) - 2 ** (w.bits - 1)).to(torch.int8)
        else:  # pack-quantized keeps the unpacked shape beside the words
            out["weight_packed"] = pack_int32(codes, w.bits)
            out["weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
        if not w.sym:
            zp = zero.round().to(torch.uint8)
            out["weight_zero_point"] = (zp.to(torch.int16) - 2 ** (w.bits - 1)).to(torch.int8) if level.acts else (
                pack_int32(zp.t(), w.bits).t().contiguous())  # fmt: skip
        return out
    if isinstance(w, FP8):
        scale = params[0].to(dtype)
        return {"weight": codes.view(torch.float8_e4m3fn), "weight_scale": scale[:1, 0] if w.per_tensor else scale}
    if isinstance(w, NVFP4):
        scale, global_ = params
        out = {"weight_packed": _nibbles(codes), "weight_scale": scale.to(torch.float8_e4m3fn),
               "weight_global_scale": global_[:1, 0].float().contiguous()}  # fmt: skip
        if isinstance(level.acts, NVFP4Acts):
            out["input_global_scale"] = global_scale(input_absmax.to(dtype).reshape(1))
        return out
    exponent = mx_exponent(params[0])
    values = _nibbles(codes) if isinstance(w, MXFP4) else codes.view(torch.float8_e4m3fn)
    return {("weight_packed" if isinstance(w, MXFP4) else "weight"): values, "weight_scale": exponent}


TAKES = (Sparsity, NM, Drop, IntWeights, FP8, NVFP4, MXFP4, MXFP8, Int8Acts, FP8Acts, NVFP4Acts)


def scheme_of(level: Level) -> tuple[str, str, str] | None:
    """The (weights args, input activation args, format) of a quantized level as JSON text (None: unquantized)."""
    if level.weights is None:
        return None
    acts = ACTS[type(level.acts)] if level.acts is not None else None
    return json.dumps(weight_args(level.weights), sort_keys=True), json.dumps(acts, sort_keys=True), checkpoint_format(
        level)  # fmt: skip


def quantization_config(plan: Plan) -> dict:
    """config.json's ``quantization_config``: one config group per distinct scheme, anchored targets, ignore."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for name, level in plan.assignment.items():
        key = scheme_of(level)
        if key is not None and (pattern := f"re:{anchored(name)}") not in groups.setdefault(key, []):
            groups[key].append(pattern)
    ignore = sorted({f"re:{anchored(n)}" for n, lv in plan.assignment.items() if lv.weights is None})
    config_groups = {f"group_{i}": {"targets": targets, "weights": json.loads(args),
                                    "input_activations": json.loads(acts), "output_activations": None, "format": fmt}
                     for i, ((args, acts, fmt), targets) in enumerate(groups.items())}  # fmt: skip
    formats = {fmt for _, _, fmt in groups}
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": ["lm_head", *ignore],
            "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {},
            "transform_config": {}}  # fmt: skip


def check(plan: Plan) -> None:
    """Refuse, naming every layer, what this format cannot hold or vLLM cannot load (split fused groups)."""
    require_parts(plan, TAKES, "a compressed-tensors checkpoint")
    require_tied(plan, scheme_of, "a compressed-tensors checkpoint")


def write(folder: Path, model: nn.Module, tokenizer, plan: Plan, grids: dict[str, tuple[torch.Tensor, tuple]],
          input_absmax: dict[str, torch.Tensor]) -> dict:  # fmt: skip
    """Write the checkpoint of ``model`` (compressed to ``plan``) into ``folder``; ``grids`` holds each quantized
    layer's codes and scale parameters, ``input_absmax`` each layer's calibrated largest input (for static
    activation scales). Returns the size report (planned and written bytes per layer)."""
    check(plan)
    state = _untied(model)
    dtype = next(model.parameters()).dtype
    written: dict[str, int] = {}
    for name, level in plan.assignment.items():
        if level.weights is None:
            written[name] = state[f"{name}.weight"].numel() * state[f"{name}.weight"].element_size()
            continue
        if name not in grids:
            raise AllocatorError(f"no codes and scales for {name}: apply the plan with a backend that records them")
        codes, params = grids[name]
        tensors = layer_tensors(level, codes, params, dtype, input_absmax.get(name))
        del state[f"{name}.weight"]
        written[name] = sum(t.numel() * t.element_size() for t in tensors.values() if t.dtype != torch.int64)
        state.update({f"{name}.{k}": v.cpu().contiguous() for k, v in tensors.items()})
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


def _untied(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each storage once: a tied ``lm_head`` shares the embedding's tensor, which safetensors
    refuses to save twice; the loader ties it again from ``tie_word_embeddings`` (as ``save_pretrained`` does)."""
    state, seen = {}, set()
    for key, value in model.state_dict().items():
        ptr = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if value.numel() and ptr in seen:
            continue
        seen.add(ptr)
        state[key] = value.detach().contiguous()
    return state


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
