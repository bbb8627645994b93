"""Activation formats: the layer's input quantized at run time, as compressed-tensors' ``forward_quantize`` does for
a (batch, seq, hidden) input on CPU: ``a8`` (int8 per token), ``afp8`` (E4M3 per token) and ``anvfp4`` (E2M1 per 16
of each token, E4M3 group scales under a calibrated global scale). They store nothing.

Per-token scales come from the last dim for any shape: CT's behaviour on the 3-D inputs of HF models (a 2-D input
would get one per-tensor scale in CT, a quirk not followed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from allocator.errors import AllocatorError
from allocator.levels.base import ActFormat
from allocator.levels.numerics import (
    E2M1_ELEMENTS,
    E4M3_MAX,
    NVFP4_GROUP,
    absmax,
    fake_quant,
    global_scale,
    half_range_scale,  # fmt: skip
    nvfp4_scale,
    to_e4m3,
)

INT8_HALF_RANGE = 127.5  # CT's (qmax - qmin) / 2 = 255 / 2


def _round_int8(x: torch.Tensor) -> torch.Tensor:
    """CT's INT rounding: clamp to [-128, 127], then round half to even."""
    return torch.round(x.clamp(-128, 127))


@dataclass(frozen=True)
class Int8Acts(ActFormat):
    """``a8``: dynamic symmetric int8 per token, scale = absmax / 127.5 in x's dtype (CT's fake quant, CT preset
    W8A8). vLLM's int8 kernel divides by 127 instead (and rounds x · 127/absmax), so served activations differ
    slightly; allocator follows CT, the reference the loader tests check against."""

    kind = "a8"

    @property
    def name(self) -> str:
        return "a8"

    @classmethod
    def parse(cls, text: str) -> Int8Acts | None:
        return cls() if text == "a8" else None

    def fake_quant(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        return fake_quant(x, half_range_scale(absmax(x), INT8_HALF_RANGE), _round_int8)


@dataclass(frozen=True)
class FP8Acts(ActFormat):
    """``afp8``: dynamic E4M3 per token, scale = absmax / 448 in x's dtype (CT preset FP8_DYNAMIC's inputs)."""

    kind = "afp8"

    @property
    def name(self) -> str:
        return "afp8"

    @classmethod
    def parse(cls, text: str) -> FP8Acts | None:
        return cls() if text == "afp8" else None

    def fake_quant(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        return fake_quant(x, half_range_scale(absmax(x), E4M3_MAX), to_e4m3)


@dataclass(frozen=True)
class NVFP4Acts(ActFormat):
    """``anvfp4``: E2M1 per 16 inputs of each token (CT preset NVFP4's inputs, dynamic "local"): the global scale is
    static, from the largest |x| the layer's input reached in calibration (``state``, llm-compressor's
    static_minmax observer); each group's E4M3 scale is computed per call under it."""

    kind = "anvfp4"
    calibrated = True

    @property
    def name(self) -> str:
        return "anvfp4"

    @classmethod
    def parse(cls, text: str) -> NVFP4Acts | None:
        return cls() if text == "anvfp4" else None

    def unfit(self, rows: int, cols: int) -> str | None:
        return f"anvfp4 needs input columns divisible by 16, got {cols}" if cols % NVFP4_GROUP else None

    def fake_quant(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        if state is None:
            raise AllocatorError("anvfp4 needs the layer input's calibrated largest |x| (state): calibrate first")
        gs = global_scale(state.to(x.device, x.dtype).reshape(1))  # [1], as CT's: a 0-d float32 would not promote
        groups = x.unflatten(-1, (-1, NVFP4_GROUP))
        eff = nvfp4_scale(absmax(groups), gs) / gs
        return fake_quant(groups, eff, E2M1_ELEMENTS.cast).flatten(-2)
