"""FP4 (E2M1) weight formats: ``nvfp4`` (groups of 16, an E4M3 scale each, one float32 global scale per tensor) and
``mxfp4`` (groups of 32, an E8M0 scale each), rounded exactly as compressed-tensors 0.19 does on CPU.

Codes are the 4-bit nibbles a checkpoint packs two to a byte (low nibble = even column): ``sign << 3 | index`` into
:data:`FP4_VALUES`; a small negative rounds to -0.0, whose nibble is 8, as CT's packer writes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from allocator.levels.floats import FloatWeights, MXFormat
from allocator.levels.numerics import (
    E2M1_ELEMENTS,
    GLOBAL_BITS,
    NVFP4_GROUP,
    absmax,
    fake_quant,
    global_scale,
    nvfp4_scale,
)


@dataclass(frozen=True)
class NVFP4(FloatWeights):
    """``nvfp4``: E2M1 in groups of 16 (CT preset NVFP4A16). The global scale (float32, one per tensor) comes from
    the largest |w| of the layer's tie group (``peers``: llm-compressor fuses q/k/v and gate/up), else the weight's.

    Params: ``(scale, global)`` per group, [rows, 1] each, float32: the E4M3 group scale as a float (stored as
    float8_e4m3fn ``weight_scale``) and the global scale repeated (``weight_global_scale`` = any one of them).
    """

    kind = "nvfp4"
    elements = E2M1_ELEMENTS
    group = NVFP4_GROUP
    tied_scale = True

    @property
    def name(self) -> str:
        return "nvfp4"

    @classmethod
    def parse(cls, text: str) -> NVFP4 | None:
        return cls() if text == "nvfp4" else None

    def overhead_bits(self, rows: int, cols: int) -> int:
        return rows * -(-cols // NVFP4_GROUP) * 8 + GLOBAL_BITS

    def effective(self, params: tuple[torch.Tensor, ...]) -> torch.Tensor:
        scale, gs = params
        return scale.float() / gs.float()

    def kernel(self, level) -> str | None:
        return "nvfp4-w4a4" if level.acts is not None else "nvfp4-a16"

    @classmethod
    def quantizer(cls, stack: Sequence[NVFP4], rows: int, device: torch.device) -> _NVFP4Quantizer:
        return _NVFP4Quantizer(rows)


class _NVFP4Quantizer:
    """Each stacked copy's global scale, found by ``prepare``; a group's E4M3 scale from it."""

    group = NVFP4_GROUP

    def __init__(self, rows: int) -> None:
        self.rows, self.gs = rows, None

    def prepare(self, W: torch.Tensor, peers: torch.Tensor | None = None) -> None:
        copies = W.shape[0] // self.rows
        if peers is not None:
            amax = peers.to(W.device, W.dtype).reshape(1).expand(copies)
        else:
            amax = W.reshape(copies, -1).abs().amax(dim=1)
        self.gs = global_scale(amax).repeat_interleave(self.rows)[:, None]  # [R, 1]

    def params(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return nvfp4_scale(absmax(block), self.gs), self.gs

    def round(self, x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        scale, gs = params
        return fake_quant(x, scale.float() / gs.float(), E2M1_ELEMENTS.cast)


@dataclass(frozen=True)
class MXFP4(MXFormat):
    """``mxfp4``: E2M1 values, an E8M0 scale per 32 (CT preset MXFP4A16); stored as ``weight_packed`` (nibbles)
    and ``weight_scale`` (uint8 exponents, :func:`allocator.levels.floats.mx_exponent`)."""

    kind = "mxfp4"
    elements = E2M1_ELEMENTS
    offset = 2

    @property
    def name(self) -> str:
        return "mxfp4"

    def kernel(self, level) -> str | None:
        return "mxfp4-a16"

    @classmethod
    def parse(cls, text: str) -> MXFP4 | None:
        return cls() if text == "mxfp4" else None
