"""Float weight formats: ``fp8`` / ``fp8t`` (E4M3, one scale per output channel / per tensor) and ``mxfp8`` (E4M3 in
groups of 32 with a power-of-two E8M0 scale), and the numerics every float kind shares.

Each rounds exactly as compressed-tensors 0.19 fake-quantizes on CPU: the same torch ops in the same dtype (for a
bf16 weight ``x / scale`` is a bf16 op, so the quotient is rounded to bf16 before it is rounded onto the grid), so
a checkpoint written from the codes and scales recorded here loads to the very weights allocator measured.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from allocator.levels.acts import FP8Acts
from allocator.levels.base import Level, WeightFormat
from allocator.levels.numerics import (
    E4M3_ELEMENTS,
    E4M3_MAX,
    E8M0_BITS,
    MX_GROUP,
    SCALE_BITS,
    Elements,
    absmax,
    fake_quant,
    float_codes,
    half_range_scale,
    mx_scale,
    to_e4m3,
)
from allocator.levels.quantizer import Params, by_column


class FloatWeights(WeightFormat):
    """Values on a float element grid times one scale per (row, group): what FP8, MX and NVFP4 share."""

    elements: ClassVar[Elements]
    group: ClassVar[int] = 0  # input columns per scale (0: the whole row)

    @property
    def value_bits(self) -> int:  # type: ignore[override]
        return self.elements.bits

    def code_group(self, cols: int) -> int:
        return self.group or cols

    def unfit(self, rows: int, cols: int) -> str | None:
        if self.group and cols % self.group:
            return f"{self.name} needs input columns divisible by {self.group}, got {cols}"
        return None

    def effective(self, params: Params) -> torch.Tensor:
        """The scale a value is multiplied by, from the recorded parameters (same shape)."""
        return params[0]

    def codes(self, Q: torch.Tensor, params: Params) -> torch.Tensor:
        return float_codes(Q, self._scale(params, Q.shape[1]), self.elements,
                           lambda c: self.dequantize(c, params, Q.dtype))  # fmt: skip

    def dequantize(self, codes: torch.Tensor, params: Params, dtype: torch.dtype) -> torch.Tensor:
        """CT's decompression: values in the scale's dtype times the scale, cast to ``dtype``."""
        scale = self._scale(params, codes.shape[1])
        return (self.elements.values(codes).to(scale.dtype) * scale).to(dtype)

    def _scale(self, params: Params, cols: int) -> torch.Tensor:
        return self.effective(by_column(params, self.group, cols))


@dataclass(frozen=True)
class FP8(FloatWeights):
    """``fp8``: E4M3 with one scale per output channel (CT preset FP8_DYNAMIC's weights); ``fp8t``: one scale for
    the tensor (preset FP8's). Scale = absmax / 448 in the weight dtype. Params: ``(scale,)``, [rows, 1]; codes:
    the E4M3 bytes a float-quantized checkpoint stores as ``weight``."""

    kind = "fp8"
    elements = E4M3_ELEMENTS
    per_tensor: bool = False

    @property
    def name(self) -> str:
        return "fp8t" if self.per_tensor else "fp8"

    @classmethod
    def parse(cls, text: str) -> FP8 | None:
        return {"fp8": cls(), "fp8t": cls(True)}.get(text)

    def overhead_bits(self, rows: int, cols: int) -> int:
        return SCALE_BITS * (1 if self.per_tensor else rows)

    def kernel(self, level: Level) -> str | None:
        """FP8 W8A8 with dynamic per-token activations (a per-tensor weight scale broadcast over its rows)."""
        return "fp8-rowwise" if isinstance(level.acts, FP8Acts) else None

    @classmethod
    def quantizer(cls, stack: Sequence[FP8], rows: int, device: torch.device) -> _FP8Quantizer:
        return _FP8Quantizer(stack[0].per_tensor, rows)


class _FP8Quantizer:
    """Per row: the row's scale; per tensor: each stacked copy's one scale, found by ``prepare``."""

    group = 0

    def __init__(self, per_tensor: bool, rows: int) -> None:
        self.per_tensor, self.rows, self.scale = per_tensor, rows, None

    def prepare(self, W: torch.Tensor, peers: torch.Tensor | None = None) -> None:
        if self.per_tensor:
            amax = W.view(-1, self.rows * W.shape[1]).abs().amax(dim=1)  # [copies]
            self.scale = half_range_scale(amax, E4M3_MAX).repeat_interleave(self.rows)[:, None]

    def params(self, block: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.scale if self.per_tensor else half_range_scale(absmax(block), E4M3_MAX),)

    def round(self, x: torch.Tensor, params: tuple[torch.Tensor]) -> torch.Tensor:
        return fake_quant(x, params[0], to_e4m3)


class MXFormat(FloatWeights):
    """OCP MX: groups of 32 values sharing an E8M0 scale (CT's generate_mx_scales). Params: ``(scale,)`` per group,
    the power of two in the weight dtype (:func:`mx_exponent` gives the stored byte)."""

    group = MX_GROUP
    offset: ClassVar[int]  # floor(log2(element max)): FP4 2, FP8 8

    def overhead_bits(self, rows: int, cols: int) -> int:
        return rows * -(-cols // MX_GROUP) * E8M0_BITS

    @classmethod
    def quantizer(cls, stack: Sequence[MXFormat], rows: int, device: torch.device) -> _MXQuantizer:
        return _MXQuantizer(cls.elements, cls.offset)


class _MXQuantizer:
    group = MX_GROUP

    def __init__(self, elements: Elements, offset: int) -> None:
        self.elements, self.offset = elements, offset

    def prepare(self, W: torch.Tensor, peers: torch.Tensor | None = None) -> None:
        return None

    def params(self, block: torch.Tensor) -> tuple[torch.Tensor]:
        return (mx_scale(absmax(block), self.offset),)

    def round(self, x: torch.Tensor, params: tuple[torch.Tensor]) -> torch.Tensor:
        return fake_quant(x, params[0], self.elements.cast)


@dataclass(frozen=True)
class MXFP8(MXFormat):
    """``mxfp8``: E4M3 values, an E8M0 scale per 32 (CT preset MXFP8A16); codes: the E4M3 bytes of ``weight``."""

    kind = "mxfp8"
    elements = E4M3_ELEMENTS
    offset = 8

    @property
    def name(self) -> str:
        return "mxfp8"

    @classmethod
    def parse(cls, text: str) -> MXFP8 | None:
        return cls() if text == "mxfp8" else None

    def kernel(self, level: Level) -> str | None:
        return "mxfp8"
