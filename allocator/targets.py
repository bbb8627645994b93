"""Deployment targets: the levels a toolkit stores and runs, priced as it stores them (``--format TARGET``).

A plan made for a target holds only levels that target takes, each tagged with it (``w4g128@vllm``; a GGUF
type such as ``q4_K`` is llama.cpp's by itself), so its bytes are the target's bytes and its exporter
reproduces it exactly. What each target takes, and why (research: ../shared/research/ecosystem.md §2):

- ``llamacpp``: GGUF types (q2_K … q8_0) and F16, each at its real bits for the layer's row length; a k-quant
  whose 256-block does not divide a row is unfit (llama-quantize would store another type there).
- ``vllm``: compressed-tensors weight-only ints as vLLM's WNA16 kernels run them: 4-bit (symmetric or with
  zero points) and 8-bit symmetric, per channel or in groups of 32/64/128 that divide the row. Stored as
  ``pack-quantized``: the values, one 16-bit scale per group, a zero point per group when asymmetric. No
  sparsity: vLLM dropped 2:4 (0.19.1+) and stores unstructured zeros dense.
- ``gptqmodel``: GPTQ checkpoints (what GPTQModel writes, vLLM's GPTQ loaders read): 2/3/4/8 bits, symmetric
  or not, per channel or groups of 32/64/128 dividing the row. The GPTQ layout always stores a packed zero
  point per group and a 32-bit ``g_idx`` per input column.
- ``autoround``: AutoRound's ``layer_config``: 2/3/4/8 bits, groups as GPTQ; 8-bit must be symmetric
  (AutoRound raises on asymmetric 8-bit); its ``auto_round`` format packs as GPTQ does (priced so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from allocator.errors import AllocatorError

GROUPS = (0, 32, 64, 128)  # per channel, or the group sizes the serving kernels (Marlin, Exllama) take


@dataclass(frozen=True)
class Target:
    """A toolkit a plan can be made for: its default grid, exporter, backends and storage layout."""

    name: str
    exporter: str  # ``allocator export --to`` format that writes it
    grid: str  # the default level grid of ``--format NAME``
    accepts: str  # what it takes, for errors and the README
    backends: tuple[str, ...]  # backends whose rounding is what the toolkit writes
    bits: tuple[int, ...] = ()
    asym_bits: tuple[int, ...] = ()
    gptq_layout: bool = False  # a zero point per group always, plus a 32-bit g_idx per input column

    def reason(self, level) -> str | None:
        """Why this target cannot store ``level`` at all (None: it can, on rows it fits)."""
        if level.kind == "dense":
            return None
        if self.name == "llamacpp":
            return None if level.gguf else f"llama.cpp stores GGUF types, not {level.name}: use q8_0 … q2_K"
        if level.gguf or level.kind != "bits":
            return f"{self.name} stores weight-only int levels (w<bits>[g<group>][a]), not {level.name}"
        if level.bits not in self.bits:
            return f"{self.name} runs {'/'.join(map(str, self.bits))}-bit weights, not {level.bits}"
        if not level.sym and level.bits not in self.asym_bits:
            return f"{self.name} runs asymmetric (zero point) weights only at {self.asym_bits} bits, not {level.name}"
        if level.group_size not in GROUPS:
            return f"{self.name} runs groups of {GROUPS[1:]} or per channel (no g), not {level.group_size}"
        return None

    def unfit(self, level, rows: int, cols: int) -> str | None:
        """Why ``level`` cannot compress a ``rows x cols`` layer for this target (row length rules)."""
        if level.group_size and cols % level.group_size:
            return f"{self.name} needs groups that divide the row: {level.group_size} does not divide {cols}"
        return None

    def storage_bits(self, level, rows: int, cols: int) -> int:
        """Exact bits the target stores for a ``rows x cols`` layer at a (non-GGUF, quantized) ``level``:
        allocator's generic count (values, a scale per group, a zero point per group if asymmetric), which is
        compressed-tensors' layout, plus what the GPTQ layout adds (zero points when symmetric too, ``g_idx``)."""
        generic = replace(level, store="").storage_bits(rows, cols)
        if not self.gptq_layout:
            return generic
        groups = rows * (math.ceil(cols / level.group_size) if level.group_size else 1)
        return generic + (groups * level.bits if level.sym else 0) + cols * 32


TARGETS = {
    "llamacpp": Target("llamacpp", "llamacpp", "gguf", "GGUF types q2_K … q8_0 and F16", ("rtn", "magnitude")),
    "vllm": Target("vllm", "llmcompressor", "dense,w8,w8g128,w4g128,w4g64,w4g32,w4g128a,w4g32a",
                   "int4 (sym or asym) / int8 (sym) weights, per channel or groups of 32/64/128",
                   ("gptq", "rtn", "magnitude"), bits=(4, 8), asym_bits=(4,)),
    "gptqmodel": Target("gptqmodel", "gptqmodel", "dense,w8g128,w4g128,w4g64,w4g32,w3g128,w3g64,w2g64,w2g32",
                        "2/3/4/8-bit weights, sym or asym, per channel or groups of 32/64/128",
                        ("gptq", "rtn", "magnitude"), bits=(2, 3, 4, 8), asym_bits=(2, 3, 4, 8), gptq_layout=True),
    "autoround": Target("autoround", "autoround", "dense,w8g128,w4g128,w4g64,w4g32,w3g128,w3g64,w2g64,w2g32",
                        "2/3/4-bit (sym or asym) and 8-bit (sym) weights, per channel or groups of 32/64/128",
                        ("gptq", "rtn", "magnitude"), bits=(2, 3, 4, 8), asym_bits=(2, 3, 4), gptq_layout=True),
}  # fmt: skip
ANY = "any"


def get_target(name: str) -> Target:
    """The target called ``name``, or a one-line error listing them."""
    if name not in TARGETS:
        raise AllocatorError(f"unknown --format {name!r}: choose one of {ANY}, {', '.join(TARGETS)}")
    return TARGETS[name]


def check_backend(target: str, backend: str) -> None:
    """Refuse a backend whose rounding the target's toolkit does not reproduce (llama-quantize runs no GPTQ)."""
    if target == ANY:
        return
    chosen = get_target(target)
    if backend not in chosen.backends:
        raise AllocatorError(
            f"--format {target} is simulated with --backend {' or '.join(chosen.backends)}: {target} does not "
            f"compress as {backend} does"
        )
