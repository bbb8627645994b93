"""vLLM (and SGLang): compressed-tensors checkpoints, each layer one scheme vLLM has a kernel for on the GPU named.

What it takes (research: ../shared/research/field_2026.md §3, ecosystem.md §2.4), per scheme and the compute
capability its kernel needs:

| scheme | levels | kernel | GPUs |
|---|---|---|---|
| W4A16 / W8A16 | ``w4g128``, ``w4g32a``, ``w8`` … (int4 sym/asym, int8 sym; channel or 32/64/128) | Marlin | all |
| INT8 W8A8 | ``w8+a8`` (per channel, dynamic per token) | CUTLASS int8 | all |
| W4A8 | ``w4g128+afp8`` (int4 groups of 128, FP8 per token) | CUTLASS W4A8 | sm90 |
| FP8 W8A8 | ``fp8+afp8`` (per channel), ``fp8t+afp8`` (per tensor) | CUTLASS / torch scaled_mm | sm89+ |
| NVFP4 A16 | ``nvfp4`` | FP4 Marlin | all |
| NVFP4 W4A4 | ``nvfp4+anvfp4`` | FP4 tensor cores | sm100 (Blackwell) |
| MXFP4 A16 | ``mxfp4`` | MXFP4 Marlin | all |
| MXFP8 | ``mxfp8`` | MX tensor cores | sm100 |

No sparsity: vLLM dropped 2:4 (0.19.1+) and stores unstructured zeros dense. Priced as compressed-tensors stores
it: allocator's generic count, except that int weights beside activation quantization are stored unpacked, one
int8 per value (``int-quantized``), and NVFP4 activations add a float32 input scale per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from allocator.errors import AllocatorError
from allocator.formats.base import GROUPS, Format
from allocator.levels import Level, parse_level
from allocator.levels.acts import FP8Acts, Int8Acts, NVFP4Acts
from allocator.levels.floats import FP8, MXFP8
from allocator.levels.fp4 import MXFP4, NVFP4
from allocator.levels.ints import IntWeights

GPUS = {"any": 999, "a100": 80, "h100": 90, "h200": 90, "b200": 100}  # compute capability (any: every kernel)


def _needs(level: Level) -> tuple[str, int] | str:
    """(scheme, the compute capability its kernel needs), or why vLLM has no kernel for the level."""
    w, a = level.weights, level.acts
    if isinstance(w, IntWeights):
        if a is None:
            if w.bits not in (4, 8) or (w.bits == 8 and not w.sym):
                return f"vLLM's WNA16 kernels run 4-bit (sym or asym) and 8-bit symmetric weights, not {w.name}"
            return ("WNA16", 80) if w.group in GROUPS else f"vLLM runs groups of {GROUPS[1:]} or per channel"
        if isinstance(a, Int8Acts):
            ok = w.bits == 8 and w.group == 0 and w.sym
            return ("INT8 W8A8", 75) if ok else "INT8 W8A8 needs 8-bit symmetric per-channel weights (w8+a8)"
        if isinstance(a, FP8Acts):
            ok = w.bits == 4 and w.group == 128 and w.sym
            return ("W4A8", 90) if ok else "W4A8 needs int4 symmetric groups of 128 (w4g128+afp8)"
    if isinstance(w, FP8):
        return ("FP8 W8A8", 89) if isinstance(a, FP8Acts) else "vLLM serves FP8 weights with FP8 activations (+afp8)"
    if isinstance(w, NVFP4):
        if a is None:
            return "NVFP4 A16", 80
        return ("NVFP4 W4A4", 100) if isinstance(a, NVFP4Acts) else "NVFP4 weights take NVFP4 activations or none"
    if isinstance(w, MXFP4) and a is None:
        return "MXFP4 A16", 80
    if isinstance(w, MXFP8) and a is None:
        return "MXFP8", 100
    return f"vLLM has no kernel for {level.name}"


@dataclass(frozen=True)
class Vllm(Format):
    """compressed-tensors schemes vLLM runs on ``gpu`` (``any``: every scheme it has a kernel for)."""

    gpu: str = "any"

    def for_gpu(self, gpu: str) -> Vllm:
        """This format restricted to what vLLM runs on ``gpu``."""
        if gpu not in GPUS:
            raise AllocatorError(f"unknown --gpu {gpu!r}: choose one of {', '.join(GPUS)}")
        return replace(self, gpu=gpu, grid=",".join(lv for lv in _GRID if _runs(lv, GPUS[gpu])))

    def reason(self, level: Level) -> str | None:
        if why := super().reason(level):
            return why
        if level.weights is None:
            return None
        needs = _needs(level)
        if isinstance(needs, str):
            return needs
        scheme, capability = needs
        if capability > GPUS[self.gpu]:
            return f"{scheme} needs compute capability {capability / 10:g} (vLLM on {self.gpu} has no kernel for it)"
        return None

    def unfit(self, level: Level, rows: int, cols: int) -> str | None:
        w = level.weights
        if isinstance(w, IntWeights) and w.group and cols % w.group:
            return f"{self.name} needs groups that divide the row: {w.group} does not divide {cols}"
        return super().unfit(level, rows, cols)

    def storage_bits(self, level: Level, rows: int, cols: int) -> int:
        generic = super().storage_bits(level, rows, cols)
        if isinstance(level.weights, IntWeights) and level.acts is not None:  # int-quantized: one int8 per value
            generic += level.kept_params(rows, cols) * (8 - level.weights.bits)
        return generic + (32 if isinstance(level.acts, NVFP4Acts) else 0)  # the input's global scale


_GRID = ("dense", "w8", "w8g128", "w4g128", "w4g64", "w4g32", "w4g128a", "w4g32a", "w8+a8", "w4g128+afp8",
         "fp8+afp8", "fp8t+afp8", "nvfp4", "nvfp4+anvfp4", "mxfp4", "mxfp8")  # fmt: skip


def _runs(name: str, capability: int) -> bool:
    needs = _needs(parse_level(name)) if name != "dense" else ("", 0)
    return not isinstance(needs, str) and needs[1] <= capability


VLLM = Vllm("vllm", "llmcompressor", ",".join(_GRID),
            "compressed-tensors schemes vLLM runs: int4/int8 weights, INT8 W8A8, W4A8, FP8 W8A8, NVFP4, MXFP4, MXFP8",
            ("gptq", "rtn", "magnitude"),
            (IntWeights, FP8, NVFP4, MXFP4, MXFP8, Int8Acts, FP8Acts, NVFP4Acts), fused=True)  # fmt: skip
