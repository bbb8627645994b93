"""The GPU kernels a compressed linear layer can run on, and which kernel each level gets.

A kernel is built from a dense ``[rows, cols]`` weight and returns a function of a 2-D input
``[tokens, cols]``. Building raises :class:`KernelUnavailable` when the installed torch or the
device cannot run it for that shape; such a level is then timed, and run, as dense: a level
with no fast kernel is only as fast as dense, and the table says so.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from allocator.errors import first_line
from allocator.levels import Level

Kernel = Callable[[torch.Tensor], torch.Tensor]

INT4_GROUPS = (32, 64, 128)
WIDTHS = (0.5, 0.75)
# kernels of the plan levels, then structured width reductions (fewer output rows / input columns)
# kernels whose levels torch has no implementation of on the GPUs measured: timed as dense, marked not runnable
NO_TORCH_KERNEL = {
    "nvfp4-a16": "vLLM runs NVFP4 weights with FP4 Marlin, which torch does not ship",
    "nvfp4-w4a4": "NVFP4 W4A4 needs FP4 tensor cores (compute capability 10.0, Blackwell)",
    "mxfp4-a16": "vLLM runs MXFP4 weights with MXFP4 Marlin, which torch does not ship",
    "mxfp8": "MXFP8 needs MX tensor cores (compute capability 10.0, Blackwell)",
}
LEVEL_KERNELS = ("dense", "2:4-cusparselt", "2:4-cutlass", "fp8", "fp8-rowwise", "int8-w8a8", "int8wo",
                 *(f"int4wo-g{g}" for g in INT4_GROUPS), *NO_TORCH_KERNEL)  # fmt: skip
WIDTH_KERNELS = tuple(f"{axis}{w:g}" for axis in ("rows", "cols") for w in WIDTHS)
ALL_KERNELS = LEVEL_KERNELS + WIDTH_KERNELS

# What a serving engine can run (research: ../shared/research/ecosystem.md §2.4, §6.4)
SERVING = {
    "dense": "vLLM: yes",
    "2:4-cusparselt": "vLLM >= 0.19.1: no (Sparse24 removed); torch semi-structured only",
    "2:4-cutlass": "vLLM >= 0.19.1: no (Sparse24 removed); torch semi-structured only",
    "fp8": "vLLM: yes (FP8 W8A8; activations quantized too)",
    "fp8-rowwise": "vLLM: yes (FP8 W8A8, per-channel weights, dynamic per-token activations; CUTLASS)",
    "int8-w8a8": "vLLM: yes (INT8 W8A8, per-channel weights, dynamic per-token activations; CUTLASS)",
    **{k: f"vLLM: {why}" for k, why in NO_TORCH_KERNEL.items()},
    "int8wo": "vLLM: yes as W8A16 (its own kernels, not this one)",
    **{f"int4wo-g{g}": "vLLM: yes as W4A16 (Marlin kernels, not this one)" for g in INT4_GROUPS},
    **{k: "any engine: a smaller dense layer" for k in WIDTH_KERNELS},
}
NO_KERNEL_NOTE = (
    "unstructured sparsity, N:M other than 2:4, 2/3/5/6/7-bit weights and W4A8 have no fast kernel here: timed as "
    "dense; NVFP4/MXFP4/MXFP8 have none in torch on this device: timed as dense, marked not runnable"
)


class KernelUnavailable(RuntimeError):
    """This torch / device / shape cannot run the kernel."""


def kernel_for(level: Level, sparse24: str = "cusparselt") -> str:
    """The kernel a level runs on, as its parts declare it (``dense`` when it has none: unstructured
    sparsity, odd bit-widths, a kind without a kernel); 2:4 runs on ``sparse24``'s implementation."""
    kernel = level.kernel
    return f"2:4-{sparse24}" if kernel == "2:4" else kernel


def build(kernel: str, weight: torch.Tensor) -> Kernel:
    """A function computing ``x @ weight.T`` with ``kernel`` (weights compressed once, here)."""
    rows, cols = weight.shape
    if kernel == "dense":
        return lambda x: F.linear(x, weight)
    if kernel.startswith(("rows", "cols")):
        w = float(kernel[4:])
        sliced = weight[: int(rows * w)] if kernel.startswith("rows") else weight[:, : int(cols * w)]
        sliced = sliced.contiguous()
        if kernel.startswith("rows"):
            return lambda x: F.linear(x, sliced)
        k = sliced.shape[1]
        return lambda x: F.linear(x[:, :k], sliced)
    if kernel in NO_TORCH_KERNEL:
        raise KernelUnavailable(NO_TORCH_KERNEL[kernel])
    if weight.device.type != "cuda":
        raise KernelUnavailable(f"{kernel} needs a CUDA device")
    try:
        if kernel.startswith("2:4-"):
            return _sparse24(weight, cutlass=kernel.endswith("cutlass"))
        if kernel == "fp8":
            return _fp8(weight)
        if kernel == "fp8-rowwise":
            return _fp8_rowwise(weight)
        if kernel == "int8-w8a8":
            return _int8_w8a8(weight)
        if kernel == "int8wo":
            return _int8_weight_only(weight)
        if kernel.startswith("int4wo-g"):
            return _int4_weight_only(weight, int(kernel.removeprefix("int4wo-g")))
    except KernelUnavailable:
        raise
    except (RuntimeError, NotImplementedError, ValueError, AttributeError, TypeError) as exc:
        raise KernelUnavailable(f"{kernel} for {rows}x{cols}: {first_line(exc, 160)}") from exc
    raise ValueError(f"unknown kernel {kernel!r}: one of {', '.join(ALL_KERNELS)}")


def _prune24(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest of every 4 consecutive input weights (the pattern the kernel needs)."""
    groups = weight.reshape(-1, 4)
    keep = groups.abs().topk(2, dim=1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, keep, True)
    return (groups * mask).reshape(weight.shape)


def _sparse24(weight: torch.Tensor, cutlass: bool) -> Kernel:
    from torch.sparse import SparseSemiStructuredTensor, to_sparse_semi_structured

    if weight.shape[1] % 64 or weight.shape[0] % 32:
        raise KernelUnavailable(f"2:4 needs rows % 32 == 0 and cols % 64 == 0, got {tuple(weight.shape)}")
    old = SparseSemiStructuredTensor._FORCE_CUTLASS
    SparseSemiStructuredTensor._FORCE_CUTLASS = cutlass
    try:
        sparse = to_sparse_semi_structured(_prune24(weight))
    finally:
        SparseSemiStructuredTensor._FORCE_CUTLASS = old
    probe = torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    F.linear(probe, sparse)  # fail at build time, not inside a timed region
    # torch returns the transposed product as a strided view; left so, it pushes attention off its
    # fast kernels (4.5x slower prefill measured on SmolLM2), so the row-major copy is part of the kernel
    return lambda x: F.linear(x, sparse).contiguous()


def _fp8(weight: torch.Tensor) -> Kernel:
    """FP8 W8A8 with per-tensor scales; the activation cast is part of the timed work."""
    if not hasattr(torch, "float8_e4m3fn"):
        raise KernelUnavailable("this torch has no float8_e4m3fn")
    if weight.shape[0] % 16 or weight.shape[1] % 16:
        raise KernelUnavailable(f"fp8 needs rows and cols divisible by 16, got {tuple(weight.shape)}")
    fmax = torch.finfo(torch.float8_e4m3fn).max
    w_scale = (weight.abs().max().float() / fmax).clamp(min=1e-12)
    w8 = (weight.float() / w_scale).to(torch.float8_e4m3fn)
    x_scale = torch.tensor(1.0, device=weight.device)
    out_dtype = weight.dtype

    def direct(x: torch.Tensor) -> torch.Tensor:
        return torch._scaled_mm(x.to(torch.float8_e4m3fn), w8.t(), scale_a=x_scale, scale_b=w_scale,
                                out_dtype=out_dtype)  # fmt: skip

    def padded(x: torch.Tensor) -> torch.Tensor:  # older kernels want tokens % 16 == 0
        pad = -x.shape[0] % 16
        return direct(F.pad(x, (0, 0, 0, pad)))[: x.shape[0]] if pad else direct(x)

    probe = torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device)
    try:
        direct(probe)
        return direct
    except RuntimeError:
        padded(probe)
        return padded


def _fp8_rowwise(weight: torch.Tensor) -> Kernel:
    """FP8 W8A8 as vLLM serves ``fp8+afp8``: per-channel weight scales, each token's activations quantized per call
    (the absmax, the scale and the cast are part of the timed work), one scaled matmul with row-wise scales."""
    if weight.shape[0] % 16 or weight.shape[1] % 16:
        raise KernelUnavailable(f"fp8 needs rows and cols divisible by 16, got {tuple(weight.shape)}")
    fmax = torch.finfo(torch.float8_e4m3fn).max
    w_scale = (weight.abs().amax(dim=1, keepdim=True).float() / fmax).clamp(min=1e-12)  # [rows, 1]
    w8 = (weight.float() / w_scale).to(torch.float8_e4m3fn)
    scale_b = w_scale.t().contiguous()  # [1, rows]

    def run(x: torch.Tensor) -> torch.Tensor:
        x_scale = (x.abs().amax(dim=1, keepdim=True).float() / fmax).clamp(min=1e-12)  # [tokens, 1]
        x8 = (x.float() / x_scale).to(torch.float8_e4m3fn)
        return torch._scaled_mm(x8, w8.t(), scale_a=x_scale, scale_b=scale_b, out_dtype=weight.dtype)

    run(torch.zeros(16, weight.shape[1], dtype=weight.dtype, device=weight.device))
    return run


def _int8_w8a8(weight: torch.Tensor) -> Kernel:
    """INT8 W8A8 as vLLM serves ``w8+a8``: per-channel int8 weights, per-token int8 activations quantized per call,
    torch's int8 matmul (int32 accumulators; it wants more than 16 rows, so a decode step is padded), rescaled."""
    w_scale = (weight.abs().amax(dim=1).float() / 127).clamp(min=1e-12)  # [rows]
    w8 = (weight.float() / w_scale[:, None]).round().clamp(-128, 127).to(torch.int8).t().contiguous()  # [cols, rows]

    def run(x: torch.Tensor) -> torch.Tensor:
        tokens = x.shape[0]
        x_scale = (x.abs().amax(dim=1, keepdim=True).float() / 127).clamp(min=1e-12)  # [tokens, 1]
        x8 = (x.float() / x_scale).round().clamp(-128, 127).to(torch.int8)
        if tokens <= 16 or tokens % 8:
            x8 = F.pad(x8, (0, 0, 0, max(32, -(-tokens // 8) * 8) - tokens))
        acc = torch._int_mm(x8, w8)[:tokens]  # [tokens, rows] int32
        return (acc.float() * x_scale * w_scale[None, :]).to(weight.dtype)

    run(torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device))
    return run


def _int8_weight_only(weight: torch.Tensor) -> Kernel:
    scale = (weight.abs().amax(dim=1).float() / 127).clamp(min=1e-12)
    w8 = (weight.float() / scale[:, None]).round().clamp(-128, 127).to(torch.int8)
    scales = scale.to(weight.dtype)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int8pack_mm(x, w8, scales)

    run(torch.zeros(1, weight.shape[1], dtype=weight.dtype, device=weight.device))
    return run


def _int4_weight_only(weight: torch.Tensor, group: int) -> Kernel:
    """tinygemm int4 (asymmetric, one bf16 scale and zero per group): torch's own W4A16 kernel."""
    rows, cols = weight.shape
    if weight.dtype != torch.bfloat16:
        raise KernelUnavailable("int4 weight-only needs bfloat16")
    inner = 8 if cols % (8 * 16) == 0 else 4 if cols % (4 * 16) == 0 else 2
    if cols % group or cols % (inner * 16) or rows % 8:
        raise KernelUnavailable(f"int4 g{group} needs cols % {group} == 0, cols % 32 == 0, rows % 8 == 0")
    w = weight.float().reshape(rows, cols // group, group)
    lo, hi = w.amin(dim=2), w.amax(dim=2)
    scale = ((hi - lo) / 15).clamp(min=1e-6)
    q = ((w - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.int32).reshape(rows, cols)
    zero = lo + 8 * scale  # tinygemm dequantizes (q - 8) * scale + zero
    packed = torch._convert_weight_to_int4pack((q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8), inner)
    scales_zeros = torch.stack([scale.t(), zero.t()], dim=2).contiguous().to(torch.bfloat16)

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm(x, packed, group, scales_zeros)

    run(torch.zeros(1, cols, dtype=weight.dtype, device=weight.device))
    return run


class KernelLinear(nn.Module):
    """A linear layer running a compressed kernel, for end-to-end checks at real shapes."""

    def __init__(self, fn: Kernel, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.fn, self.bias = fn, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fn(x.reshape(-1, x.shape[-1]).contiguous())  # the int4/int8 kernels need a contiguous input
        y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y + self.bias if self.bias is not None else y
