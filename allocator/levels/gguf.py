"""GGUF tensor types as weight formats (``q4_K``, ``q8_0``, …): llama.cpp's own storage, by name.

A type packs ``block`` weights of one row into ``type_size`` bytes (gguf-py's ``GGML_QUANT_SIZES``: q4_K 144
bytes per 256 weights = 4.5 bits). A type whose block does not divide a row is unfit there: llama-quantize
would store another type (its fallback, :func:`stored_type`), so a plan never asks for one.
RTN rounds each type as llama-quantize does (:mod:`allocator.levels.ggml`, bit-exact); GPTQ approximates it
by the nearest bits / group / symmetry (q4_K: 4 bits, groups of 32, with a minimum per group).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from allocator.errors import AllocatorError
from allocator.levels.base import WeightFormat
from allocator.levels.ints import IntWeights
from allocator.levels.quantizer import Quantizer

# nearest bits / group / symmetry (ggml-quants.c: q8_0/q5_0/q4_0 symmetric blocks of 32, q5_1/q4_1 with a
# minimum; q6_K/q3_K symmetric sub-blocks of 16; q5_K/q4_K/q2_K sub-blocks of 32/32/16 with a minimum each)
NEAREST = {"q8_0": IntWeights(8, 32), "q6_K": IntWeights(6, 16), "q5_K": IntWeights(5, 32, False),
           "q5_1": IntWeights(5, 32, False), "q5_0": IntWeights(5, 32), "q4_K": IntWeights(4, 32, False),
           "q4_1": IntWeights(4, 32, False), "q4_0": IntWeights(4, 32), "q3_K": IntWeights(3, 16),
           "q2_K": IntWeights(2, 16, False)}  # fmt: skip
GGUF_GRID = "dense," + ",".join(NEAREST)  # ``--levels gguf``: every type llama.cpp stores


def block(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a GGUF type, e.g. ``q4_K`` -> (256, 144)."""
    import gguf

    try:
        quant = gguf.GGMLQuantizationType[type_name.upper()]
    except KeyError:
        raise AllocatorError(f"unknown GGUF type {type_name!r}: use one of q2_K .. q8_0, f16") from None
    return gguf.GGML_QUANT_SIZES[quant]


# llama-quantize's fallback for a 256-block type whose block does not divide the row (llama-quant.cpp)
FALLBACK = {"q2_K": "q4_0", "q3_K": "q4_0", "q4_K": "q5_0", "q5_K": "q5_1", "q6_K": "q8_0", "iq4_xs": "iq4_nl"}


def stored_type(type_name: str, cols: int) -> str:
    """The type llama-quantize really writes for a row of ``cols`` weights when asked for ``type_name``."""
    size, _ = block(type_name)
    if cols % size == 0:
        return type_name
    fallback = FALLBACK.get(type_name, type_name if size <= 32 else None)
    if fallback is None:
        raise AllocatorError(f"llama.cpp has no fallback for {type_name} on rows of {cols} weights")
    return fallback if cols % block(fallback)[0] == 0 else "f16"


def stored_bits(type_name: str, rows: int, cols: int) -> int:
    """Bits llama.cpp stores for a ``rows`` x ``cols`` weight asked to be ``type_name`` (after any fallback)."""
    return gguf_bits(stored_type(type_name, cols), rows, cols)


def gguf_bits(type_name: str, rows: int, cols: int) -> int:
    """Bits a ``rows x cols`` tensor of ``type_name`` takes (whole blocks per row)."""
    size, nbytes = block(type_name)
    return rows * (cols // size) * nbytes * 8


@dataclass(frozen=True)
class GGUFType(WeightFormat):
    """One of llama.cpp's tensor types, stored as llama.cpp stores it."""

    kind = "gguf"
    native_format = "llamacpp"
    alone = True
    cache_tag = {"ggml": 1}  # rounded as llama-quantize rounds (ggml.py), not by the nearest int grid
    type_name: str

    @property
    def name(self) -> str:
        return self.type_name

    @classmethod
    def parse(cls, text: str) -> GGUFType | None:
        found = next((t for t in NEAREST if t.lower() == text.lower()), None)
        return cls(found) if found else None

    @property
    def nearest(self) -> IntWeights:
        """The integer grid GPTQ approximates this type by."""
        return NEAREST[self.type_name]

    @property
    def value_bits(self) -> int:  # type: ignore[override]
        return self.nearest.bits

    def storage_bits(self, rows: int, cols: int, kept: int) -> int:
        return gguf_bits(self.type_name, rows, cols)

    def unfit(self, rows: int, cols: int) -> str | None:
        size, _ = block(self.type_name)
        return f"{self.type_name}'s {size}-weight block does not divide rows of {cols}" if cols % size else None

    def code_group(self, cols: int) -> int:
        return self.nearest.group

    def stack_key(self) -> tuple:
        # GGUF types stack with each other by their nearest grid, never with the integer formats (another quantizer)
        return (GGUFType, self.nearest.stack_key())

    @classmethod
    def quantizer(cls, stack: Sequence[GGUFType], rows: int, device: torch.device) -> Quantizer:
        return IntWeights.quantizer([f.nearest for f in stack], rows, device)

    def rtn(self, W: torch.Tensor, record=None, peers=None) -> torch.Tensor:
        """What llama-quantize writes for ``W`` (bit-exact), its shape fallback included (no grid to record:
        the GGUF writer re-derives the blocks, which is exact, :func:`allocator.levels.ggml.ggml_quantize`)."""
        from allocator.levels.ggml import ggml_roundtrip

        stored = stored_type(self.type_name, W.shape[1])
        return W.half().to(W.dtype) if stored == "f16" else ggml_roundtrip(W, stored)
