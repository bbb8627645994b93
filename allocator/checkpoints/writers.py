"""The checkpoint ``allocator apply`` writes: the compressed model itself, in the format its engine loads.

- ``compressed-tensors`` (vLLM, SGLang; transformers with the compressed-tensors package): codes and scales
  packed, one config group per scheme (:mod:`allocator.checkpoints.compressed_tensors`).
- ``gguf`` (llama.cpp): the model's GGUF with the planned tensors re-packed in their types, as llama-quantize
  packs them (:mod:`allocator.checkpoints.gguf`); a plan made with ``--format llamacpp``.
- ``hf``: de-quantized weights with zeros, in the model's dtype (``save_pretrained``): any toolkit reads it.

Every checkpoint holds the plan and a size report: the bytes the plan priced and the bytes written, per layer.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np

from allocator.checkpoints import compressed_tensors
from allocator.checkpoints.gguf import write_gguf
from allocator.errors import AllocatorError
from allocator.export.common import require_parts
from allocator.export.llamacpp import gguf_name
from allocator.levels.gguf import GGUFType
from allocator.moe import fuse_experts
from allocator.plan import Plan

WRITERS = ("compressed-tensors", "gguf", "hf")


def default_writer(plan: Plan) -> str:
    """GGUF for a llama.cpp plan; compressed-tensors where it can hold the plan (its kinds, fused groups kept
    whole) and some layer is quantized; else dense (hf)."""
    if plan.format == "llamacpp":
        return "gguf"
    if any(".experts." in n for n in plan.assignment):
        return "hf"
    try:
        compressed_tensors.check(plan)
    except AllocatorError:
        return "hf"
    return "compressed-tensors" if any(lv.quantized for lv in plan.assignment.values()) else "hf"


def write(kind: str, folder: Path, session, plan: Plan, grids: dict) -> dict:
    """Write ``kind`` of checkpoint of the session's model (compressed to ``plan``) into the new ``folder``."""
    if kind not in WRITERS:
        raise AllocatorError(f"unknown checkpoint format {kind!r}: choose one of {', '.join(WRITERS)}")
    model, tokenizer = session.model, session.loaded.tokenizer
    if kind == "gguf":
        return _gguf(folder, session, plan)
    experts = [n for n in plan.assignment if ".experts." in n]
    if kind == "compressed-tensors":
        if experts:
            raise AllocatorError(f"compressed-tensors checkpoints of routed experts are not written yet "
                                 f"({len(experts)} expert layers): apply with --checkpoint hf")  # fmt: skip
        return compressed_tensors.write(folder, model, tokenizer, plan, _codes(model, plan, grids),
                                        session.activation_state)  # fmt: skip
    written = {name: model.get_submodule(name).weight.nbytes for name in plan.assignment}
    fuse_experts(model)  # a mixture-of-experts checkpoint in the layout transformers loads
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return compressed_tensors.size_report(plan, written)


def _codes(model, plan: Plan, grids: dict) -> dict:
    """Each quantized layer's codes (from its weight and the grid the backend used) and grid parameters."""
    out = {}
    for name, level in plan.assignment.items():
        if not level.quantized or name not in grids:
            continue
        Q = model.get_submodule(name).weight.detach()
        codes = level.weights.codes(Q, grids[name])
        if codes is None or not level.weights.dequantize(codes, grids[name], Q.dtype).equal(Q):
            raise AllocatorError(f"{name}: its weights are not codes on the grid recorded for {level.name}: report it")
        out[name] = (codes, grids[name])
    return out


def _gguf(folder: Path, session, plan: Plan) -> dict:
    """The source GGUF with every planned tensor in its type, rounded from the source's own values (exactly what
    allocator's RTN simulated: llama-quantize's rounding of the same numbers)."""
    source = session.loaded.gguf
    if source is None:
        raise AllocatorError(
            f"the GGUF writer starts from the model's GGUF, and {session.loaded.model_id} was not loaded from one: "
            "convert it with llama.cpp's convert_hf_to_gguf.py and pass --model FILE.gguf"
        )
    require_parts(plan, (GGUFType,), "a GGUF file (plan with --format llamacpp)")
    experts = [n for n in plan.assignment if ".experts." in n]
    if experts:
        raise AllocatorError(f"the GGUF writer does not stack routed experts yet ({len(experts)} layers): "
                             "export with --to llamacpp and run llama-quantize")  # fmt: skip
    blocks = 1 + max(block for block, role in plan.layers.values() if role != "lm_head")
    reader = gguf.GGUFReader(source)
    stored = {t.name: t for t in reader.tensors}
    names = {name: gguf_name(name, blocks) for name in plan.assignment}
    tensors = {}
    for name, level in plan.assignment.items():
        if level.quantized:
            t = stored[names[name]]
            values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            tensors[names[name]] = (level.weights.type_name, values.reshape(plan.shapes[name]))
    report = write_gguf(Path(source), folder / "model.gguf", tensors)
    written = {name: int(stored[names[name]].n_bytes) for name in plan.assignment}
    written.update({n: report["tensors"][names[n]]["bytes"] for n in plan.assignment if names[n] in tensors})
    return {**compressed_tensors.size_report(plan, written), "file_bytes": report["file_bytes"]}
