"""llama.cpp: a ``--tensor-type-file`` for ``llama-quantize`` and the command that uses it.

HF module names become GGUF tensor names through gguf-py's own ``TensorNameMap``
(``model.layers.3.mlp.down_proj`` -> ``blk.3.ffn_down``). llama-quantize lower-cases each pattern and
applies it with ``std::regex_search`` (unanchored, first match wins), so every pattern is anchored
with ``^…$``: ``blk.1.`` never matches ``blk.10.``. GGUF types have fixed block sizes, so a level's
group size is not carried: bits map to the nearest type (w4 -> q4_K, …). Research: ecosystem.md §2.11.
GGUF stores all routed experts of a block in one tensor per projection (``blk.N.ffn_{gate,up,down}_exps``),
so an MoE plan must give every expert of a block one level per projection (``--per expert-role``).
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import re

from allocator.errors import AllocatorError
from allocator.export.common import quant_setting, require_format, require_parts
from allocator.formats import storage_bits
from allocator.formats.llamacpp import stored_bits, stored_type
from allocator.levels import Level
from allocator.levels.gguf import GGUFType
from allocator.levels.ints import IntWeights
from allocator.plan import Plan
from allocator.untrusted import cell

TAKES = (IntWeights, GGUFType)
GGML_TYPES = {16: "f16", 8: "q8_0", 6: "q6_K", 5: "q5_K", 4: "q4_K", 3: "q3_K", 2: "q2_K"}
log = logging.getLogger(__name__)
_ARCHS = ("LLAMA", "QWEN2", "QWEN3", "GEMMA3", "GPT2", "QWEN2MOE", "PHI3", "GPTNEOX")  # tried in turn to name a tensor


def gguf_name(hf_name: str, n_blocks: int) -> str:
    """The GGUF tensor name of an HF module (``…down_proj`` -> ``blk.3.ffn_down.weight``)."""
    for mapping in _name_maps(n_blocks):
        name = mapping.get_name(hf_name)
        if name is not None:
            return f"{name}.weight"
    raise AllocatorError(f"no GGUF tensor name for {hf_name!r}: llama.cpp does not know this layer's architecture")


@functools.lru_cache(maxsize=8)
def _name_maps(n_blocks: int) -> tuple:
    """gguf-py's name maps of the architectures tried, built once per block count (each takes milliseconds)."""
    import gguf

    return tuple(gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), n_blocks) for arch in _ARCHS)


def export(plan: Plan, backend: str | None = None) -> dict[str, str]:
    """``tensor-types.txt`` (one ``^blk\\.N\\.x\\.weight$=type`` per line), ``llama-quantize.sh`` and
    ``stored-types.csv`` (per tensor: the type asked for, the type llama.cpp stores for its shape, bits)."""
    require_format(plan, "llamacpp", "llama.cpp")
    require_parts(plan, TAKES, "llama.cpp")
    odd = sorted({lv.name for lv in plan.assignment.values() if quant_setting(lv)[0] not in GGML_TYPES})
    if odd:
        raise AllocatorError(f"llama.cpp has no type for {odd}: use {sorted(GGML_TYPES)}-bit levels")
    blocks = 1 + max(block for block, role in plan.layers.values() if role != "lm_head")
    tensors = _expert_tensors(plan)
    tensors.update({gguf_name(n, blocks): lv for n, lv in plan.assignment.items() if ".experts." not in n})
    lines = [f"^{re.escape(name)}$={_type(lv)}" for name, lv in tensors.items()]
    quantized = [lv.weights.value_bits for lv in plan.assignment.values() if lv.weights is not None]
    base = GGML_TYPES[max(set(quantized), key=quantized.count)].upper() if quantized else "Q8_0"
    # GGUF-type levels are stored exactly as planned (a plan made with --levels gguf never asks for a fallback);
    # other quantized levels map to the nearest type by bits and may fall back
    table = io.StringIO()
    rows = csv.writer(table, lineterminator="\n")  # the csv module quotes; cell() defuses spreadsheet formulas
    rows.writerow(["layer", "asked", "stored", "plan_bits", "stored_bits"])
    planned, stored, fell = 0, 0, 0
    for name, level in plan.assignment.items():
        r, c = plan.shapes[name]
        kind = _type(level)
        written, mine, theirs = stored_type(kind, c), storage_bits(level, r, c), stored_bits(kind, r, c)
        planned, stored, fell = planned + mine, stored + theirs, fell + (written != kind)
        rows.writerow([cell(name), kind, written, mine, theirs])
    params = sum(r * c for r, c in plan.shapes.values())
    if fell:
        log.warning("llama.cpp stores %d of %d layers in another type than the plan's (row size not a multiple of "
                    "the type's block): %.4f bits/weight instead of the plan's %.4f", fell, len(plan.assignment),
                    stored / params, planned / params)  # fmt: skip
    script = _SCRIPT.format(n=len(lines), planned=planned / params, stored=stored / params, fell=fell, base=base)
    return {"tensor-types.txt": "\n".join(lines) + "\n", "llama-quantize.sh": script,
            "stored-types.csv": table.getvalue()}  # fmt: skip


def _type(level: Level) -> str:
    """The GGUF type for a level: its own for a GGUF-type level, else the nearest by bits."""
    w = level.weights
    return w.type_name if isinstance(w, GGUFType) else GGML_TYPES[quant_setting(level)[0]]


_SCRIPT = """#!/usr/bin/env bash
# Quantize a GGUF of the plan's model to the plan's per-tensor types (made by allocator export --to llamacpp).
#   usage: bash llama-quantize.sh IN.gguf OUT.gguf   (llama-quantize on PATH, or LLAMA_QUANTIZE=/path/to/it)
# IN is the plan's model as GGUF: F16/F32 keeps the most quality; an already quantized IN (e.g. Q4_1) is
# re-quantized (--allow-requantize is added when IN holds quantized tensors; needs gguf-py: pip install gguf).
# {n} tensors are set by tensor-types.txt; the rest get the base type {base}.
# The plan's compressed layers: {planned:.4f} bits/weight as planned; {stored:.4f} as llama.cpp stores them
# ({fell} layers fall back to another type for their row size; per layer: stored-types.csv).
set -euo pipefail
IN=${{1:?usage: bash llama-quantize.sh IN.gguf OUT.gguf}}
OUT=${{2:?usage: bash llama-quantize.sh IN.gguf OUT.gguf}}
HERE=$(cd "$(dirname "$0")" && pwd)
EXTRA=()
if python3 -c 'import sys, gguf; r = gguf.GGUFReader(sys.argv[1]); \\
sys.exit(0 if any(t.tensor_type.name not in ("F32", "F16", "BF16") for t in r.tensors) else 1)' "$IN"; then
  EXTRA+=(--allow-requantize)
fi
"${{LLAMA_QUANTIZE:-llama-quantize}}" "${{EXTRA[@]}}" --tensor-type-file "$HERE/tensor-types.txt" "$IN" "$OUT" {base}
"""


_EXPERT = re.compile(r"\.(\d+)\.[\w.]*experts\.\d+\.(gate_up_proj|down_proj|gate_proj|up_proj)$")
_EXPS = {"gate_up_proj": ("gate", "up"), "gate_proj": ("gate",), "up_proj": ("up",), "down_proj": ("down",)}


def _expert_tensors(plan: Plan) -> dict[str, Level]:
    """GGUF expert tensor name -> the one level all of the block's experts take for that projection."""
    levels: dict[str, set] = {}
    for name, level in plan.assignment.items():
        if m := _EXPERT.search(name):
            for proj in _EXPS[m.group(2)]:
                levels.setdefault(f"blk.{m.group(1)}.ffn_{proj}_exps.weight", set()).add(level)
    split = sorted(t for t, lv in levels.items() if len(lv) > 1)
    if split:
        raise AllocatorError(
            f"llama.cpp stores a block's experts in one tensor per projection, but the plan gives the experts of "
            f"{split} different levels: re-plan with --per expert-role"
        )
    return {t: next(iter(lv)) for t, lv in levels.items()}
