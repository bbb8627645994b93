"""Compression levels and their exact costs.

A level says how one linear layer is compressed: unstructured sparsity, an N:M pattern,
a weight bit-width with a group size, a sparse+quantized combination, or dropped.
Levels are frozen values with a short readable name (``"s0.5"``, ``"2:4"``, ``"w4g128"``,
``"s0.5+w4g128"``, ``"drop"``) so that plans serialise to plain JSON. A GGUF type (``"q4_K"``) is a level
too: llama.cpp's own storage, priced as llama.cpp stores it for each layer's shape (its block sizes and
shape fallback, :mod:`allocator.export.gguf_types`) and simulated by the backends as the nearest
bits / group / symmetry (e.g. q4_K: 4 bits, groups of 32, with a minimum per group) by GPTQ, and exactly as
llama-quantize rounds it by RTN (:mod:`allocator.backends.ggml`). A level made for a deployment target is tagged
with it (``w4g64@vllm``, ``--format``): priced as that target stores it, unfit where it cannot run it
(:mod:`allocator.targets`).

Costs are exact integers for a given ``(rows, cols)`` weight shape, so budgets in kept
parameters, bytes or average bits are exact. The storage model (documented in
``Level.storage_bits``) counts values, sparsity metadata, scales and zero points.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from allocator.errors import AllocatorError

DENSE_BITS = 16  # dense weights are stored in bf16/fp16
SCALE_BITS = 16  # one fp16 scale per quantization group and row


@dataclass(frozen=True)
class Level:
    """One compression level of a linear layer.

    ``sparsity`` is the unstructured fraction removed (per layer); ``n``/``m`` keep n of every m
    consecutive input weights; ``bits``/``group_size``/``sym`` describe weight quantization
    (``group_size=0`` means one scale per output row); ``drop`` removes the layer's output.
    """

    sparsity: float = 0.0
    n: int = 0
    m: int = 0
    bits: int = DENSE_BITS
    group_size: int = 0
    sym: bool = True
    drop: bool = False
    gguf: str = ""  # a llama.cpp tensor type: stored (and priced) as that type
    store: str = ""  # a deployment target (allocator.targets) whose layout prices it: ``w4g128@vllm``

    # ---- names -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The canonical short name, the inverse of :func:`parse_level`."""
        if self.drop:
            return "drop"
        if self.gguf:
            return self.gguf
        parts = []
        if self.m:
            parts.append(f"{self.n}:{self.m}")
        elif self.sparsity > 0:
            parts.append(f"s{_fmt(self.sparsity)}")
        if self.quantized:
            g = f"g{self.group_size}" if self.group_size else ""
            parts.append(f"w{self.bits}{g}{'' if self.sym else 'a'}")
        return "+".join(parts) + (f"@{self.store}" if self.store else "") if parts else "dense"

    @property
    def target(self) -> str:
        """The deployment target this level was made for ("" for allocator's generic storage)."""
        return "llamacpp" if self.gguf else self.store

    def __str__(self) -> str:
        return self.name

    @property
    def quantized(self) -> bool:
        """True when weights are stored with fewer than 16 bits."""
        return self.bits < DENSE_BITS

    @property
    def kind(self) -> str:
        """The level type: dense, sparsity, nm, bits, sparse+bits, gguf or drop."""
        if self.drop:
            return "drop"
        if self.gguf:
            return "gguf"
        sparse = "nm" if self.m else ("sparsity" if self.sparsity > 0 else "")
        if sparse and self.quantized:
            return "sparse+bits"
        return sparse or ("bits" if self.quantized else "dense")

    # ---- costs -------------------------------------------------------------------------
    def pruned_per_row(self, cols: int) -> int:
        """Weights removed in each output row (rounded up, so a level never misses its target)."""
        if self.drop:
            return cols
        if self.m:
            return cols // self.m * (self.m - self.n)
        return min(cols, math.ceil(self.sparsity * cols - 1e-9))

    def kept_params(self, rows: int, cols: int) -> int:
        """Non-zero weights left in a ``rows x cols`` layer."""
        return rows * (cols - self.pruned_per_row(cols))

    def storage_bits(self, rows: int, cols: int) -> int:
        """Exact storage of the compressed layer in bits.

        values: kept weights x bits; unstructured sparsity: a 1-bit mask per weight; N:M: a
        ceil(log2 m)-bit index per kept weight (the cuSPARSELt 2:4 layout); quantization: one
        fp16 scale per (row, group) and, when asymmetric, one ``bits``-bit zero point per group.
        """
        if self.drop:
            return 0
        if self.gguf:
            from allocator.export.gguf_types import stored_bits

            return stored_bits(self.gguf, rows, cols)
        if self.store:
            from allocator.targets import get_target

            return get_target(self.store).storage_bits(self, rows, cols)
        kept = self.kept_params(rows, cols)
        total = kept * self.bits
        if self.m:
            total += kept * math.ceil(math.log2(self.m))
        elif self.sparsity > 0:
            total += rows * cols
        if self.quantized:
            groups = rows * (math.ceil(cols / self.group_size) if self.group_size else 1)
            total += groups * (SCALE_BITS + (0 if self.sym else self.bits))
        return total

    def storage_bytes(self, rows: int, cols: int) -> float:
        """Storage in bytes (bits / 8; may be fractional for odd sizes)."""
        return self.storage_bits(rows, cols) / 8

    def unfit_reason(self, rows: int, cols: int) -> str | None:
        """Why this level cannot compress a ``rows x cols`` layer, or None if it can."""
        if self.gguf:
            from allocator.export.gguf_types import stored_type

            stored = stored_type(self.gguf, cols)
            return None if stored == self.gguf else f"llama.cpp stores {self.gguf} as {stored} for rows of {cols}"
        if self.store:
            from allocator.targets import get_target

            return get_target(self.store).unfit(self, rows, cols)
        if self.m and cols % self.m:
            return f"{self.name} needs input columns divisible by {self.m}, got {cols}"
        return None  # a quantization group that does not divide cols leaves a shorter last group


DENSE = Level()
# llama.cpp's types with their nearest bits/group/symmetry (ggml-quants.c: q8_0/q5_0/q4_0 symmetric blocks of 32,
# q5_1/q4_1 with a minimum; q6_K/q3_K symmetric sub-blocks of 16; q5_K/q4_K/q2_K sub-blocks of 32/32/16 with a
# minimum each): what GPTQ approximates them by; RTN rounds them as llama-quantize does (allocator.backends.ggml).
# A k-quant is unfit where its 256-weight block does not divide a row: llama-quantize
# would store another type there, so the grid offers that type itself (q4_K -> q5_0) and plans stay exact.
_GGUF = (Level(bits=8, group_size=32, gguf="q8_0"), Level(bits=6, group_size=16, gguf="q6_K"),
         Level(bits=5, group_size=32, sym=False, gguf="q5_K"), Level(bits=5, group_size=32, sym=False, gguf="q5_1"),
         Level(bits=5, group_size=32, gguf="q5_0"), Level(bits=4, group_size=32, sym=False, gguf="q4_K"),
         Level(bits=4, group_size=32, sym=False, gguf="q4_1"), Level(bits=4, group_size=32, gguf="q4_0"),
         Level(bits=3, group_size=16, gguf="q3_K"), Level(bits=2, group_size=16, sym=False, gguf="q2_K"))  # fmt: skip
GGUF_LEVELS = {lv.gguf.lower(): lv for lv in _GGUF}
GGUF_GRID = "dense," + ",".join(lv.gguf for lv in _GGUF)  # ``--levels gguf``: every type llama.cpp stores
_SPARSE = re.compile(r"^s(?P<s>\d*\.?\d+)$")
_NM = re.compile(r"^(?P<n>\d+):(?P<m>\d+)$")
_BITS = re.compile(r"^w(?P<b>\d+)(?:g(?P<g>\d+))?(?P<a>a?)$")


def _fmt(x: float) -> str:
    return f"{x:.4f}".rstrip("0").rstrip(".") if x else "0"


def parse_level(text: str) -> Level:
    """Parse a level name such as ``s0.5``, ``2:4``, ``w4g128``, ``w3a``, ``s0.5+w4g128``, ``drop``."""
    name, _, store = text.strip().lower().partition("@")
    if store:
        return for_target(parse_level(name), store)
    if name in ("dense", "s0", "s0.0"):
        return DENSE
    if name == "drop":
        return Level(drop=True)
    if name in GGUF_LEVELS:
        return GGUF_LEVELS[name]
    fields: dict = {}
    for part in name.split("+"):
        if mt := _SPARSE.match(part):
            s = float(mt["s"])
            if not 0 <= s < 1:
                raise AllocatorError(f"level {text!r}: sparsity must be in [0, 1), got {s}")
            fields["sparsity"] = round(s, 6)
        elif mt := _NM.match(part):
            n, m = int(mt["n"]), int(mt["m"])
            if not 0 < n < m:
                raise AllocatorError(f"level {text!r}: N:M needs 0 < N < M, got {n}:{m}")
            fields.update(n=n, m=m, sparsity=round(1 - n / m, 6))
        elif mt := _BITS.match(part):
            b = int(mt["b"])
            if not 2 <= b <= 8:
                raise AllocatorError(f"level {text!r}: bits must be in 2..8, got {b}")
            fields.update(bits=b, group_size=int(mt["g"] or 0), sym=not mt["a"])
        else:
            raise AllocatorError(
                f"unknown level {text!r}: use s<fraction> (s0.5), N:M (2:4), w<bits>[g<group>][a] "
                "(w4g128, w3a), a sparse+bits pair (s0.5+w4g128), a GGUF type (q4_K) or drop"
            )
    return Level(**fields)


def for_target(level: Level, target: str) -> Level:
    """``level`` as ``target`` stores it (tagged ``@target``), or a one-line error saying what the target takes."""
    from allocator.targets import ANY, get_target

    if target == ANY or level.kind == "dense" or level.target == target:
        return level
    chosen = get_target(target)
    if level.target:
        raise AllocatorError(f"level {level.name} is made for {level.target}, not {target}: use {target}'s levels")
    if why := chosen.reason(level):
        raise AllocatorError(f"--format {target} cannot use level {level.name} ({why}); it takes {chosen.accepts}")
    return replace(level, store=target)


def with_dense(levels: list[Level]) -> list[Level]:
    """``levels`` with ``dense`` first (once): profiles and databases always hold the uncompressed level."""
    return list(dict.fromkeys([parse_level("dense"), *levels]))


def parse_grid(text: str, target: str = "any") -> list[Level]:
    """Parse a comma-separated level grid; ``a:b:step`` ranges expand to sparsity levels.

    ``"0:0.9:0.1"`` is unstructured sparsity 0%..90% in 10% steps; ``"dense,2:4,w4g128"`` lists levels;
    ``"gguf"`` is dense and every GGUF type llama.cpp stores (each priced as stored, unfit where it falls back).
    With a ``target`` (``--format``), every level is that target's (``w4g128`` -> ``w4g128@vllm``) or refused.
    """
    levels: list[Level] = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item.lower() == "gguf":
            levels += parse_grid(GGUF_GRID)
        elif item.count(":") == 2:
            try:
                lo, hi, step = (float(x) for x in item.split(":"))
            except ValueError:
                raise AllocatorError(f"grid range {item!r}: write START:STOP:STEP as numbers, e.g. 0:0.9:0.1") from None
            if not (step > 0 and hi >= lo):  # also refuses nan
                raise AllocatorError(f"grid range {item!r}: need start <= stop and step > 0")
            count = int(round((hi - lo) / step)) + 1
            if count > MAX_RANGE_LEVELS:
                raise AllocatorError(
                    f"grid range {item!r} expands to {count} levels (at most {MAX_RANGE_LEVELS}): use a larger step"
                )
            levels += [parse_level(f"s{lo + i * step:.6f}") for i in range(count)]
        else:
            levels.append(parse_level(item))
    unique = list(dict.fromkeys(for_target(lv, target) for lv in levels))
    if not unique:
        raise AllocatorError(f"empty level grid {text!r}: give at least one level, e.g. 0:0.9:0.1")
    return unique


def target_grid(levels: str | None, target: str = "any") -> list[Level]:
    """The grid of a run: ``levels`` if given, else the target's default (``--format``), else sparsity 0..0.9."""
    from allocator.targets import ANY, get_target

    return parse_grid(levels or (DEFAULT_GRID if target == ANY else get_target(target).grid), target)


DEFAULT_GRID = "0:0.9:0.1"
MAX_RANGE_LEVELS = 200  # a range step so small that the grid cannot be profiled is a typo
