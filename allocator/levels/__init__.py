"""Compression levels: parts composed into a level, each kind declared in one file (see :mod:`.base`)."""

from allocator.levels.base import DENSE_BITS, ActFormat, Level, Part, Pruning, WeightFormat
from allocator.levels.quantizer import Quantizer
from allocator.levels.registry import DEFAULT_GRID, DENSE, KINDS, parse_grid, parse_level, with_dense

__all__ = ["DEFAULT_GRID", "DENSE", "DENSE_BITS", "KINDS", "ActFormat", "Level", "Part", "Pruning", "Quantizer",
           "WeightFormat", "parse_grid", "parse_level", "with_dense"]  # fmt: skip
