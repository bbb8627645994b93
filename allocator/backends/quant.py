"""Round-to-nearest weight quantization on a per-row, per-group grid (the GPTQ quantizer)."""

from __future__ import annotations

import torch

from allocator.levels import Level


def grid_params(W: torch.Tensor, bits: int | torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point per row of ``W`` ([rows, g]) so that 0 is exactly representable.

    The range always contains 0 (as in GPTQ), so pruned zeros stay zeros after quantization.
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


def rtn(W: torch.Tensor, level: Level) -> torch.Tensor:
    """Quantize ``W`` ([rows, cols]) group by group along the input dimension (a GGUF type: as llama.cpp does)."""
    if level.gguf:
        return _as_llamacpp(W, level.gguf)
    g = level.group_size or W.shape[1]
    out = torch.empty_like(W)
    for c in range(0, W.shape[1], g):
        block = W[:, c : c + g]
        scale, zero = grid_params(block, level.bits, level.sym)
        out[:, c : c + g] = quantize(block, scale, zero, level.bits)
    return out


def _as_llamacpp(W: torch.Tensor, kind: str) -> torch.Tensor:
    """What llama-quantize writes for ``W`` asked to be ``kind`` (its shape fallback included)."""
    from allocator.backends.ggml import ggml_roundtrip
    from allocator.export.gguf_types import stored_type

    stored = stored_type(kind, W.shape[1])
    return W.half().to(W.dtype) if stored == "f16" else ggml_roundtrip(W, stored)
