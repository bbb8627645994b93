"""GGUF tensor types as llama.cpp stores them: bits from gguf-py's block sizes, and llama-quantize's fallback.

A GGUF type packs ``block`` weights of one row into ``type_size`` bytes (gguf-py's ``GGML_QUANT_SIZES``:
q4_K 144 bytes per 256 weights = 4.5 bits). llama-quantize cannot use a type whose block does not divide
a tensor's row (its ``ne[0]``: the layer's input features), and silently stores another
(``tensor_type_fallback`` in llama.cpp ``src/llama-quant.cpp``): q4_K -> q5_0 for SmolLM2's 576-wide rows,
so a plan priced at q4_K's 4.5 bits is stored at 5.5. These functions say what is really stored.
"""

from __future__ import annotations

from allocator.errors import AllocatorError

# llama-quantize's fallback for a 256-block type whose block does not divide the row (llama-quant.cpp)
FALLBACK = {"q2_K": "q4_0", "q3_K": "q4_0", "q4_K": "q5_0", "q5_K": "q5_1", "q6_K": "q8_0", "iq4_xs": "iq4_nl"}


def block(kind: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a GGUF type, e.g. ``q4_K`` -> (256, 144)."""
    import gguf

    try:
        quant = gguf.GGMLQuantizationType[kind.upper()]
    except KeyError:
        raise AllocatorError(f"unknown GGUF type {kind!r}: use one of q2_K .. q8_0, f16") from None
    return gguf.GGML_QUANT_SIZES[quant]


def stored_type(kind: str, cols: int) -> str:
    """The type llama-quantize really writes for a row of ``cols`` weights when asked for ``kind``."""
    size, _ = block(kind)
    if cols % size == 0:
        return kind
    fallback = FALLBACK.get(kind, kind if size <= 32 else None)
    if fallback is None:
        raise AllocatorError(f"llama.cpp has no fallback for {kind} on rows of {cols} weights")
    return fallback if cols % block(fallback)[0] == 0 else "f16"


def stored_bits(kind: str, rows: int, cols: int) -> int:
    """Bits llama.cpp stores for a ``rows`` x ``cols`` weight asked to be ``kind`` (after any fallback)."""
    size, nbytes = block(stored_type(kind, cols))
    return rows * (cols // size) * nbytes * 8
