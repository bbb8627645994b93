"""Formats of integer weights in the GPTQ layout: GPTQModel and AutoRound (research: ecosystem.md §2).

- ``gptqmodel``: GPTQ checkpoints: 2/3/4/8 bits, symmetric or not, per channel or groups of 32/64/128 dividing
  the row. The GPTQ layout always stores a packed zero point per group and a 32-bit ``g_idx`` per input column.
- ``autoround``: as GPTQModel, but 8-bit must be symmetric (AutoRound raises on asymmetric 8-bit); its
  ``auto_round`` format packs as GPTQ does (priced so).
"""

from __future__ import annotations

from dataclasses import dataclass

from allocator.formats.base import GROUPS, Format
from allocator.levels import Level
from allocator.levels.ints import IntWeights


@dataclass(frozen=True)
class IntFormat(Format):
    """Integer weight-only formats: bit-widths, which of them may be asymmetric, groups, the GPTQ layout."""

    bits: tuple[int, ...] = ()
    asym_bits: tuple[int, ...] = ()
    gptq_layout: bool = False  # a zero point per group always, plus a 32-bit g_idx per input column

    def reason(self, level: Level) -> str | None:
        if why := super().reason(level):
            return why
        w = level.weights
        if not isinstance(w, IntWeights):
            return None
        if w.bits not in self.bits:
            return f"{self.name} runs {'/'.join(map(str, self.bits))}-bit weights, not {w.bits}"
        if not w.sym and w.bits not in self.asym_bits:
            return f"{self.name} runs asymmetric (zero point) weights only at {self.asym_bits} bits, not {w.name}"
        if w.group not in GROUPS:
            return f"{self.name} runs groups of {GROUPS[1:]} or per channel (no g), not {w.group}"
        return None

    def unfit(self, level: Level, rows: int, cols: int) -> str | None:
        w = level.weights
        if isinstance(w, IntWeights) and w.group and cols % w.group:
            return f"{self.name} needs groups that divide the row: {w.group} does not divide {cols}"
        return super().unfit(level, rows, cols)

    def storage_bits(self, level: Level, rows: int, cols: int) -> int:
        """The generic count (compressed-tensors' layout), plus what the GPTQ layout adds (zero points when
        symmetric too, ``g_idx``)."""
        generic = super().storage_bits(level, rows, cols)
        w = level.weights
        if not self.gptq_layout or not isinstance(w, IntWeights):
            return generic
        return generic + (w.groups(rows, cols) * w.bits if w.sym else 0) + cols * 32


_GPTQ_GRID = "dense,w8g128,w4g128,w4g64,w4g32,w3g128,w3g64,w2g64,w2g32"
GPTQMODEL = IntFormat("gptqmodel", "gptqmodel", _GPTQ_GRID,
                      "2/3/4/8-bit weights, sym or asym, per channel or groups of 32/64/128",
                      ("gptq", "rtn", "magnitude"), (IntWeights,), bits=(2, 3, 4, 8), asym_bits=(2, 3, 4, 8),
                      fused=True, gptq_layout=True)  # fmt: skip
AUTOROUND = IntFormat("autoround", "autoround", _GPTQ_GRID,
                      "2/3/4-bit (sym or asym) and 8-bit (sym) weights, per channel or groups of 32/64/128",
                      ("gptq", "rtn", "magnitude"), (IntWeights,), bits=(2, 3, 4, 8), asym_bits=(2, 3, 4),
                      fused=True, gptq_layout=True)  # fmt: skip
