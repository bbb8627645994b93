"""A deployment format: what a serving engine or toolkit stores and runs, and how it prices a level for a shape.

A plan made for a format (``--format NAME``) holds only levels the format takes, each tagged with it
(``w4g128@vllm``; a GGUF type is llama.cpp's by itself), so its bytes are the format's bytes and the format's
writer reproduces it exactly. A format says which part kinds it takes (by class, never by name), which settings
of them (bits, groups, symmetry), which rows it cannot serve, and what it stores beyond allocator's generic count.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from allocator.errors import AllocatorError
from allocator.levels import Level, Part, parse_grid

GROUPS = (0, 32, 64, 128)  # per channel, or the group sizes the serving kernels (Marlin, Exllama) take


@dataclass(frozen=True)
class Format:
    """A target a plan can be made for: its default grid, writer, backends and storage layout."""

    name: str
    exporter: str  # ``allocator export --to`` format that writes it
    grid: str  # the default level grid of ``--format NAME``
    accepts: str  # what it takes, for errors and the docs
    backends: tuple[str, ...]  # backends whose rounding is what the toolkit writes
    takes: tuple[type[Part], ...] = ()  # part kinds it stores
    fused: bool = False  # its engine fuses q/k/v and gate/up into one layer: one level per tie group

    def reason(self, level: Level) -> str | None:
        """Why this format cannot store ``level`` at all (None: it can, on rows it fits)."""
        alien = [p.name for p in level.parts if not isinstance(p, self.takes)]
        if alien:
            return f"{self.name} stores {self.accepts}, not {', '.join(alien)}"
        return None

    def unfit(self, level: Level, rows: int, cols: int) -> str | None:
        """Why ``level`` cannot compress a ``rows x cols`` layer in this format (row-length rules)."""
        return level.unfit_reason(rows, cols)

    def storage_bits(self, level: Level, rows: int, cols: int) -> int:
        """Exact bits this format stores for a ``rows x cols`` layer at ``level``: the generic count by default."""
        return replace(level, format="").storage_bits(rows, cols)

    def tag(self, level: Level) -> Level:
        """``level`` as this format stores it (tagged), or a one-line error saying what the format takes."""
        if level.is_dense or level.format == self.name:
            return level
        if level.format:
            raise AllocatorError(f"level {level.name} is made for {level.format}, not {self.name}: use its levels")
        if why := self.reason(level):
            raise AllocatorError(f"--format {self.name} cannot use level {level.name} ({why})")
        return replace(level, format=self.name)

    def parse_grid(self, text: str | None) -> list[Level]:
        """The grid ``text`` (default: this format's own), every level tagged with this format or refused."""
        return list(dict.fromkeys(self.tag(lv) for lv in parse_grid(text or self.grid)))

    def check_backend(self, backend: str) -> None:
        """Refuse a backend whose rounding the format's toolkit does not reproduce (llama-quantize runs no GPTQ)."""
        if self.backends and backend not in self.backends:
            raise AllocatorError(
                f"--format {self.name} is simulated with --backend {' or '.join(self.backends)}: {self.name} "
                f"does not compress as {backend} does"
            )
