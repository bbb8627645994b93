"""Pruning parts: unstructured sparsity (``s0.5``), N:M (``2:4``), and dropping the layer (``drop``)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from allocator.errors import AllocatorError
from allocator.levels.base import Part, Pruning, fmt_number

_SPARSE = re.compile(r"^s(?P<s>\d*\.?\d+)$")
_NM = re.compile(r"^(?P<n>\d+):(?P<m>\d+)$")


@dataclass(frozen=True)
class Sparsity(Pruning):
    """Unstructured: ⌈s·cols⌉ weights removed per row-equivalent; a 1-bit mask per weight records which."""

    kind = "sparsity"
    fraction: float

    @property
    def name(self) -> str:
        return f"s{fmt_number(self.fraction)}"

    @classmethod
    def parse(cls, text: str) -> Sparsity | None:
        if not (mt := _SPARSE.match(text)):
            return None
        s = float(mt["s"])
        if not 0 <= s < 1:
            raise AllocatorError(f"level {text!r}: sparsity must be in [0, 1), got {s}")
        return cls(round(s, 6))

    @property
    def sparsity(self) -> float:
        return self.fraction

    def pruned_per_row(self, cols: int) -> int:
        return min(cols, math.ceil(self.fraction * cols - 1e-9))

    def index_bits(self, rows: int, cols: int, kept: int) -> int:
        return rows * cols


@dataclass(frozen=True)
class NM(Pruning):
    """N:M: n of every m consecutive input weights kept; a ⌈log2 m⌉-bit index per kept weight (cuSPARSELt 2:4)."""

    kind = "nm"
    n: int
    m: int

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}"

    @classmethod
    def parse(cls, text: str) -> NM | None:
        if not (mt := _NM.match(text)):
            return None
        n, m = int(mt["n"]), int(mt["m"])
        if not 0 < n < m:
            raise AllocatorError(f"level {text!r}: N:M needs 0 < N < M, got {n}:{m}")
        return cls(n, m)

    @property
    def sparsity(self) -> float:
        return round(1 - self.n / self.m, 6)

    @property
    def nm(self) -> tuple[int, int]:
        return self.n, self.m

    def pruned_per_row(self, cols: int) -> int:
        return cols // self.m * (self.m - self.n)

    def index_bits(self, rows: int, cols: int, kept: int) -> int:
        return kept * math.ceil(math.log2(self.m))

    def unfit(self, rows: int, cols: int) -> str | None:
        return f"{self.name} needs input columns divisible by {self.m}, got {cols}" if cols % self.m else None

    def kernel(self, level) -> str | None:
        return "2:4" if (self.n, self.m) == (2, 4) else None


@dataclass(frozen=True)
class Drop(Part):
    """The layer removed: its output is zero, so its block's residual passes the input on. Stores nothing."""

    kind = "drop"
    slot = "drop"
    alone = True

    @property
    def name(self) -> str:
        return "drop"

    @classmethod
    def parse(cls, text: str) -> Drop | None:
        return cls() if text == "drop" else None
