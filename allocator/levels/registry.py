"""The registry of part kinds, and level names and grids parsed through it.

A level name is its parts joined by ``+`` in slot order (``s0.5+w4g128``, ``fp8+afp8``), optionally tagged with
the deployment format that stores it (``w4g128@vllm``); ``dense`` has no parts. Each part is parsed by the one
kind that recognises it, so a new kind is a file and one line in :data:`KINDS`.
"""

from __future__ import annotations

from allocator.errors import AllocatorError
from allocator.levels.acts import FP8Acts, Int8Acts, NVFP4Acts
from allocator.levels.base import Level, Part, compose
from allocator.levels.floats import FP8, MXFP8
from allocator.levels.fp4 import MXFP4, NVFP4
from allocator.levels.gguf import GGUF_GRID, GGUFType
from allocator.levels.ints import IntWeights
from allocator.levels.pruning import NM, Drop, Sparsity

KINDS: dict[str, type[Part]] = {cls.kind: cls for cls in (Sparsity, NM, IntWeights, FP8, NVFP4, MXFP4, MXFP8,
                                                           GGUFType, Int8Acts, FP8Acts, NVFP4Acts, Drop)}  # fmt: skip
DENSE = Level()
DEFAULT_GRID = "0:0.9:0.1"
MAX_RANGE_LEVELS = 200  # a range step so small that the grid cannot be profiled is a typo


def _part(text: str, whole: str) -> Part:
    found = [p for cls in KINDS.values() if (p := cls.parse(text)) is not None]
    if len(found) != 1:
        raise AllocatorError(
            f"unknown level {whole!r}: use s<fraction> (s0.5), N:M (2:4), w<bits>[g<group>][a] (w4g128, w3a), "
            "fp8 / fp8t, nvfp4, mxfp4, mxfp8, a GGUF type (q4_K), activations a8 / afp8 / anvfp4 after a weight "
            "format (w8+a8, fp8+afp8), parts joined by + (s0.5+w4g128), or drop"
        )
    return found[0]


def parse_level(text: str) -> Level:
    """Parse a level name such as ``s0.5``, ``2:4``, ``w4g128``, ``s0.5+w4g128``, ``fp8+afp8``, ``w4g128@vllm``."""
    name, _, format = text.strip().partition("@")
    if name.lower() in ("dense", "s0", "s0.0"):
        return DENSE
    parts = [_part(p, text) for p in name.split("+")]
    parts = [p for p in parts if not (isinstance(p, Sparsity) and p.fraction == 0)]
    return compose(parts, text, format.lower())


def with_dense(levels: list[Level]) -> list[Level]:
    """``levels`` with ``dense`` first (once): profiles and databases always hold the uncompressed level."""
    return list(dict.fromkeys([DENSE, *levels]))


def parse_grid(text: str) -> list[Level]:
    """Parse a comma-separated level grid; ``a:b:step`` ranges expand to sparsity levels.

    ``"0:0.9:0.1"`` is unstructured sparsity 0%..90% in 10% steps; ``"dense,2:4,w4g128"`` lists levels;
    ``"gguf"`` is dense and every GGUF type llama.cpp stores.
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
    unique = list(dict.fromkeys(levels))
    if not unique:
        raise AllocatorError(f"empty level grid {text!r}: give at least one level, e.g. 0:0.9:0.1")
    return unique
