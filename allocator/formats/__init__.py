"""Deployment formats by name, and the one place a level is priced and checked for a shape.

Every cost of a plan (budgets, achieved bits, profiles, exports) goes through :func:`storage_bits` and
:func:`unfit`: a level tagged with a format (``w4g128@vllm``) is priced as that format stores it, any other by
allocator's generic count.
"""

from __future__ import annotations

from allocator.errors import AllocatorError
from allocator.formats.base import Format
from allocator.formats.ints import AUTOROUND, GPTQMODEL
from allocator.formats.llamacpp import LLAMACPP
from allocator.formats.vllm import GPUS, VLLM
from allocator.levels import DEFAULT_GRID, Level, Part, parse_grid

ANY = "any"
FORMATS: dict[str, Format] = {f.name: f for f in (LLAMACPP, VLLM, GPTQMODEL, AUTOROUND)}


class _Generic(Format):
    """No deployment format: every level, allocator's generic storage."""

    def tag(self, level: Level) -> Level:
        return level


GENERIC = _Generic(ANY, "json", DEFAULT_GRID, "every level", (), (Part,))


def get_format(name: str, gpu: str = "any") -> Format:
    """The format called ``name`` (``any``: the generic one), restricted to what runs on ``gpu`` where the format
    knows (vLLM's kernels), or a one-line error listing them."""
    if name == ANY:
        return GENERIC
    if name not in FORMATS:
        raise AllocatorError(f"unknown --format {name!r}: choose one of {ANY}, {', '.join(FORMATS)}")
    chosen = FORMATS[name]
    return chosen.for_gpu(gpu) if hasattr(chosen, "for_gpu") else chosen


def storage_bits(level: Level, rows: int, cols: int) -> int:
    """Exact bits of a ``rows x cols`` layer at ``level``, as its format (if tagged) stores it."""
    return get_format(level.format).storage_bits(level, rows, cols) if level.format else level.storage_bits(rows, cols)


def unfit(level: Level, rows: int, cols: int) -> str | None:
    """Why ``level`` cannot compress a ``rows x cols`` layer (its parts' rules and its format's), or None."""
    return get_format(level.format).unfit(level, rows, cols) if level.format else level.unfit_reason(rows, cols)


def check_level(level: Level) -> None:
    """Refuse a tagged level whose format is unknown or does not store it (plans read from files)."""
    if level.format and (why := get_format(level.format).reason(level)):
        raise AllocatorError(f"level {level.name}: {why}")


def format_grid(text: str | None, format: str = ANY, gpu: str = "any") -> list[Level]:
    """The grid of a run: ``text`` if given, else the format's default, each level tagged with the format."""
    return get_format(format, gpu).parse_grid(text) if format != ANY else parse_grid(text or DEFAULT_GRID)


__all__ = ["ANY", "FORMATS", "GENERIC", "GPUS", "Format", "check_level", "format_grid", "get_format", "storage_bits",
           "unfit"]  # fmt: skip
