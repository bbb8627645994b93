"""The number formats the float level kinds share: E4M3 and E2M1 elements, and compressed-tensors' scale rules.

Each function is the torch op compressed-tensors 0.19 runs on CPU, in the same dtype (for a bf16 tensor ``x / scale``
is a bf16 op), so weights and activations rounded here equal CT's fake quantization bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from allocator.levels.quantizer import exact_codes

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
SCALE_BITS = 16  # FP8's scales are stored in the model dtype (bf16/fp16)
E8M0_BITS = 8  # an MX scale is a biased power-of-two exponent
MX_GROUP = 32


@dataclass(frozen=True)
class Elements:
    """A float element type: how a scaled value rounds onto it, and its codes (a sign bit over a magnitude index,
    monotonic in the value, so a code that lands a hair off is fixed by a neighbour)."""

    bits: int
    max: float
    top: int  # the largest magnitude index (E4M3's 0x7F is NaN)
    cast: Callable[[torch.Tensor], torch.Tensor]  # clamp to ±max and round onto the grid, in the input's dtype
    index: Callable[[torch.Tensor], torch.Tensor]  # magnitude index of |values| already on the grid
    values: Callable[[torch.Tensor], torch.Tensor]  # codes -> float32 values (signed)


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """CT's FP8 rounding: clamp to ±448, round-to-nearest-even cast to E4M3, back to ``x``'s dtype."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).to(x.dtype)


E4M3_ELEMENTS = Elements(8, E4M3_MAX, 0x7E, to_e4m3, lambda a: a.to(E4M3).view(torch.uint8),
                         lambda c: c.view(E4M3).float())  # fmt: skip


def absmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Largest |x| along ``dim`` (kept): CT's max(|min(x, 0)|, max(x, 0)), which is the same number."""
    return x.abs().amax(dim=dim, keepdim=True)


def half_range_scale(amax: torch.Tensor, half_range: float, eps: bool = True) -> torch.Tensor:
    """CT's symmetric scale ``amax / ((qmax - qmin) / 2)`` in ``amax``'s dtype (the divisor a tensor, as CT's);
    ``eps``: a zero scale (an all-zero row) becomes that dtype's eps, as CT keeps ``x / scale`` finite."""
    scale = amax / torch.tensor(half_range, dtype=amax.dtype, device=amax.device)
    return scale.masked_fill(scale == 0, torch.finfo(scale.dtype).eps) if eps else scale


def fake_quant(x: torch.Tensor, scale: torch.Tensor, cast: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """CT's ``_quantize_dequantize``: ``x / scale`` in the promoted dtype, plus CT's all-zero zero point (which
    turns a -0.0 quotient into +0.0), rounded by ``cast``, times ``scale``, in ``x``'s dtype."""
    q = cast(x / scale + 0.0)
    return (q.to(scale.dtype) * scale).to(x.dtype)


def mx_scale(amax: torch.Tensor, offset: int) -> torch.Tensor:
    """CT's MX scale of groups whose largest |x| is ``amax``, in its dtype: 2^(e - 127) with the E8M0 exponent
    e = 127 + log2(P) - offset, P = amax rounded to a power of two on its bits (up from 1.75·2^k, not OCP's plain
    floor, so the group max never clips); a scale that underflows the dtype becomes 1, CT's uint8 eps."""
    finfo = torch.finfo(amax.dtype)
    mant = round(-math.log2(finfo.eps))
    ints = {16: torch.int16, 32: torch.int32}[finfo.bits]
    bits = amax.view(ints).int()  # amax >= 0: the sign bit is clear
    power = ((bits + (1 << (mant - 2))) & (((1 << (finfo.bits - 1 - mant)) - 1) << mant)).to(ints).view(amax.dtype)
    e = 127 + torch.floor(torch.log2(power)) - offset
    e = torch.round(e.clamp(0, 255)).to(torch.uint8)
    scale = (2.0 ** (e.int() - 127).float()).to(amax.dtype)
    return scale.masked_fill(scale == 0, 1.0)


def mx_exponent(scale: torch.Tensor) -> torch.Tensor:
    """The E8M0 byte a checkpoint stores for an MX scale (CT's ``compress_mx_scale``)."""
    return (127 + torch.floor(torch.log2(scale.float())).int()).to(torch.uint8)


def float_codes(Q: torch.Tensor, scale: torch.Tensor, elements: Elements,
                decode: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:  # fmt: skip
    """Codes (uint8: sign bit over magnitude index) that ``decode`` maps to ``Q`` exactly; ``scale`` is the
    effective scale per column. The sign is Q's sign bit, so a -0.0 keeps its code as CT's packer writes it."""
    ratio = (Q.float() / scale.float()).abs().clamp(max=elements.max)
    sign = torch.signbit(Q).to(torch.uint8) << (elements.bits - 1)
    mag = exact_codes(elements.index(ratio).float(), Q, lambda m: decode(sign | m.to(torch.uint8)), elements.top)
    return sign | mag


FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP4_MAX = 6.0
_TIES_DOWN = (0.25, 1.25, 2.5, 5.0)  # midpoints that round down, to an even mantissa (CT's cast_to_fp4)
_TIES_UP = (0.75, 1.75, 3.5)  # midpoints that round up
NVFP4_GROUP = 16
GLOBAL_BITS = 32  # NVFP4's float32 global scale, one per tensor
E4M3_EPS = 0.125  # CT's replacement for a zero E4M3 group scale


def fp4_index(a: torch.Tensor) -> torch.Tensor:
    """Index into :data:`FP4_VALUES` of the E2M1 magnitude nearest ``a`` (>= 0), ties to even as CT rounds."""
    down = torch.tensor(_TIES_DOWN, dtype=a.dtype, device=a.device)
    up = torch.tensor(_TIES_UP, dtype=a.dtype, device=a.device)
    return torch.bucketize(a, down) + torch.bucketize(a, up, right=True)


def cast_to_fp4(x: torch.Tensor) -> torch.Tensor:
    """CT's ``cast_to_fp4``: the nearest E2M1 magnitude times sign(x), in ``x``'s dtype (so -0.25 gives -0.0)."""
    values = torch.tensor(FP4_VALUES, dtype=x.dtype, device=x.device)
    return values[fp4_index(x.abs())] * torch.sign(x)


def fp4_values(codes: torch.Tensor) -> torch.Tensor:
    """Nibbles -> float32 values (CT's ``unpack_fp4_from_uint8`` before its cast)."""
    values = torch.tensor(FP4_VALUES, device=codes.device)
    sign = torch.where((codes & 8).bool(), -1.0, 1.0)
    return values[(codes & 7).long()] * sign


E2M1_ELEMENTS = Elements(4, FP4_MAX, 7, lambda x: cast_to_fp4(x.clamp(-FP4_MAX, FP4_MAX)), fp4_index, fp4_values)


def global_scale(amax: torch.Tensor) -> torch.Tensor:
    """CT's ``generate_gparam`` for a tensor whose largest |x| is ``amax``: 448·6 / amax in ``amax``'s dtype (as
    torch evaluates ``2688.0 / t``: t's reciprocal, rounded, times 2688), 1 where that is not finite; float32."""
    amax = amax.clamp(min=torch.finfo(amax.dtype).tiny)
    gs = E4M3_MAX * FP4_MAX / amax
    return torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0).float()


def nvfp4_scale(amax: torch.Tensor, gs: torch.Tensor) -> torch.Tensor:
    """CT's NVFP4 group scale (float32, E4M3-valued): E4M3(clamp(gs · (amax / 6 in amax's dtype), ±448)), a zero
    scale replaced by 0.125. The effective scale a value is multiplied by is this / ``gs``."""
    s = (gs * half_range_scale(amax, FP4_MAX, eps=False)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float()
    return s.masked_fill(s == 0, E4M3_EPS)
