"""Integer weights: ``w<bits>[g<group>][a]`` — b-bit codes per (row, group) on an affine grid (GPTQ's quantizer).

Stored as b-bit codes, one fp16 scale per (row, group) (group 0: per row) and, when asymmetric (``a``), a
b-bit zero point per group. The grid always contains 0, so pruned zeros stay zeros after quantization.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from allocator.errors import AllocatorError
from allocator.levels.acts import Int8Acts
from allocator.levels.base import WeightFormat
from allocator.levels.quantizer import Params, by_column, exact_codes

SCALE_BITS = 16  # one fp16 scale per quantization group and row
_BITS = re.compile(r"^w(?P<b>\d+)(?:g(?P<g>\d+))?(?P<a>a?)$")


def grid_params(W: torch.Tensor, bits: int | torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per row of ``W`` ([rows, g]) so that 0 is exactly representable.

    ``bits`` may be a [rows, 1] tensor (several levels stacked along rows).
    """
    maxq = 2**bits - 1
    xmin = W.min(dim=1, keepdim=True).values.clamp(max=0)
    xmax = W.max(dim=1, keepdim=True).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin, xmax = xmin.masked_fill(empty, -1), xmax.masked_fill(empty, 1)
    scale = (xmax - xmin) / maxq  # [rows, 1]
    zero = torch.ones_like(scale) * ((maxq + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int | torch.Tensor) -> torch.Tensor:
    """Dequantized round-to-nearest value of ``w`` on the grid ``scale * (q - zero)``, q in [0, 2^b - 1]."""
    q = (torch.round(w / scale) + zero).clamp(min=0).minimum(torch.as_tensor(2**bits - 1, dtype=w.dtype))
    return scale * (q - zero)


@dataclass(frozen=True)
class IntWeights(WeightFormat):
    """b-bit integer weights, per row or per group of ``group`` input columns, symmetric or with zero points."""

    kind = "int"
    bits: int
    group: int = 0
    sym: bool = True

    @property
    def name(self) -> str:
        return f"w{self.bits}{f'g{self.group}' if self.group else ''}{'' if self.sym else 'a'}"

    @classmethod
    def parse(cls, text: str) -> IntWeights | None:
        if not (mt := _BITS.match(text)):
            return None
        b = int(mt["b"])
        if not 2 <= b <= 8:
            raise AllocatorError(f"level {text!r}: bits must be in 2..8, got {b}")
        return cls(b, int(mt["g"] or 0), not mt["a"])

    @property
    def value_bits(self) -> int:  # type: ignore[override]
        return self.bits

    def groups(self, rows: int, cols: int) -> int:
        """Scale groups of a ``rows x cols`` weight (a group that does not divide cols leaves a shorter last one)."""
        return rows * (math.ceil(cols / self.group) if self.group else 1)

    def overhead_bits(self, rows: int, cols: int) -> int:
        return self.groups(rows, cols) * (SCALE_BITS + (0 if self.sym else self.bits))

    def code_group(self, cols: int) -> int:
        return self.group or cols

    def stack_key(self) -> tuple:
        return (IntWeights, self.group, self.sym)  # bit-widths may differ row-block by row-block

    def kernel(self, level) -> str | None:
        if level.acts is not None:  # W8A8: int8 weights per channel, int8 activations per token
            w8a8 = self.bits == 8 and self.group == 0 and self.sym and isinstance(level.acts, Int8Acts)
            return "int8-w8a8" if w8a8 else None
        if self.bits == 8 and self.group == 0:
            return "int8wo"
        return f"int4wo-g{self.group}" if self.bits == 4 and self.group in (32, 64, 128) else None

    @classmethod
    def quantizer(cls, stack: Sequence[IntWeights], rows: int, device: torch.device) -> _IntQuantizer:
        return _IntQuantizer(stack, rows, device)

    def codes(self, Q: torch.Tensor, params: Params) -> torch.Tensor:
        """Unsigned codes q in [0, 2^b) with Q = scale · (q − zero) (compressed-tensors' offset-binary code)."""
        scale, zero = by_column(params, self.group, Q.shape[1])
        guess = Q.float() / scale.float() + zero.float()
        return exact_codes(guess, Q, lambda c: self.dequantize(c, params, Q.dtype), 2**self.bits - 1)

    def dequantize(self, codes: torch.Tensor, params: Params, dtype: torch.dtype) -> torch.Tensor:
        scale, zero = by_column(params, self.group, codes.shape[1])
        return (scale * (codes.to(scale.dtype) - zero)).to(dtype)


class _IntQuantizer:
    """GPTQ's min/max grid per (row, group); stacked copies may differ in bit-width."""

    def __init__(self, stack: Sequence[IntWeights], rows: int, device: torch.device) -> None:
        self.group, self.sym = stack[0].group, stack[0].sym
        bits = [f.bits for f in stack]
        self.bits: int | torch.Tensor = bits[0]
        if len(set(bits)) > 1:
            self.bits = torch.tensor(bits, device=device).repeat_interleave(rows)[:, None]  # [R, 1]

    def prepare(self, W: torch.Tensor, peers: torch.Tensor | None = None) -> None:
        return None

    def params(self, block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return grid_params(block, self.bits, self.sym)

    def round(self, x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return quantize(x, *params, self.bits)
