"""llama.cpp's GGUF: F16 and the GGUF types, each at its real bits for the layer's row length.

llama-quantize cannot use a type whose block does not divide a tensor's row (its ``ne[0]``: the layer's input
features) and silently stores another (``tensor_type_fallback`` in llama.cpp ``src/llama-quant.cpp``): q4_K ->
q5_0 for SmolLM2's 576-wide rows, so a plan priced at q4_K's 4.5 bits is stored at 5.5. A GGUF-type level is
unfit there (plans made for llama.cpp never ask for a fallback); :func:`stored_type` says what llama.cpp writes
for a generic plan's levels. llama-quantize runs no GPTQ: plans are simulated with RTN (bit-exact ggml rounding).
"""

from __future__ import annotations

from dataclasses import dataclass

from allocator.formats.base import Format
from allocator.levels.gguf import FALLBACK, GGUFType, stored_bits, stored_type

__all__ = ["FALLBACK", "LLAMACPP", "LlamaCpp", "stored_bits", "stored_type"]


@dataclass(frozen=True)
class LlamaCpp(Format):
    """GGUF types only (F16 is ``dense``); a type is priced by its blocks and unfit where llama.cpp falls back."""


LLAMACPP = LlamaCpp("llamacpp", "llamacpp", "gguf", "GGUF types q2_K … q8_0 and F16", ("rtn", "magnitude"),
                    (GGUFType,))  # fmt: skip
