"""A level is composed from parts; each part kind declares, in one place, everything the rest of allocator asks.

A part fills one *slot* of a level: ``prune`` (unstructured sparsity, N:M), ``weights`` (a number format and
scale layout: ints, FP8, FP4, a GGUF type), ``acts`` (activation quantization at the layer's input) or
``drop`` (the layer removed). A kind says how its name is written and parsed, what it stores for a
``(rows, cols)`` weight, how a backend applies it (a pruning pattern, or a quantizer that RTN and GPTQ drive)
and which latency kernel runs it (None: it costs dense). Nothing else in allocator compares a kind by name:
exporters and formats say which part classes they take.

A level's storage is composed exactly: kept weights × the weight format's bits per value (16 when
unquantized), plus the pruning part's index bits, plus the weight format's scales and zero points.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from allocator.errors import AllocatorError
from allocator.levels.quantizer import Params, Quantizer, Recorder

DENSE_BITS = 16  # unquantized weights are stored in bf16/fp16
SLOTS = ("prune", "weights", "acts", "drop")  # a level holds at most one part per slot, named in this order


class Part:
    """One ingredient of a level (subclasses are frozen dataclasses registered in :data:`allocator.levels.KINDS`)."""

    kind: ClassVar[str]  # the registry key
    slot: ClassVar[str]  # one of SLOTS
    native_format: ClassVar[str] = ""  # a deployment format this part belongs to by itself (GGUF types: llamacpp)
    alone: ClassVar[bool] = False  # combines with no other part (drop, a GGUF type)
    cache_tag: ClassVar[dict[str, int]] = {}  # enters cached measurements' keys: bump when the rounding changes

    @property
    def name(self) -> str:
        """The part's name in a level name (``s0.5``, ``w4g128``, ``afp8``)."""
        raise NotImplementedError

    @classmethod
    def parse(cls, text: str) -> Part | None:
        """The part written as ``text``, None if ``text`` is not of this kind; raise if it is, but malformed."""
        raise NotImplementedError

    def unfit(self, rows: int, cols: int) -> str | None:
        """Why this part cannot compress a ``rows x cols`` weight (None: it can)."""
        return None

    def kernel(self, level: Level) -> str | None:
        """The latency kernel that runs ``level`` when this part leads it (None: no fast kernel, costs dense)."""
        return None


class Pruning(Part):
    """Removes weights: how many per row, what the pattern's index costs, and which pattern the backends follow."""

    slot = "prune"

    @property
    def sparsity(self) -> float:
        """The fraction of weights removed."""
        raise NotImplementedError

    @property
    def nm(self) -> tuple[int, int] | None:
        """(n, m) when n of every m consecutive inputs are kept, else None (unstructured, per row)."""
        return None

    def pruned_per_row(self, cols: int) -> int:
        """Weights removed in each output row (rounded up, so a level never misses its target)."""
        raise NotImplementedError

    def index_bits(self, rows: int, cols: int, kept: int) -> int:
        """Bits that record where the kept weights are."""
        raise NotImplementedError


class WeightFormat(Part):
    """Stores weights in fewer bits: bits per value, scales, and the quantizer RTN and GPTQ use."""

    slot = "weights"
    value_bits: int  # bits per stored (kept) value
    tied_scale: ClassVar[bool] = False  # its per-tensor scale is shared across a tie group (NVFP4's global scale)

    def overhead_bits(self, rows: int, cols: int) -> int:
        """Scales, zero points and global scales stored beside the values."""
        return 0

    def storage_bits(self, rows: int, cols: int, kept: int) -> int:
        """Bits of ``kept`` values of a ``rows x cols`` weight in this format."""
        return kept * self.value_bits + self.overhead_bits(rows, cols)

    def code_group(self, cols: int) -> int:
        """Input columns whose values come from one small table (the level database's codebook group)."""
        return cols

    def stack_key(self) -> tuple:
        """Formats with equal keys quantize one stacked weight together (GPTQ's column loop)."""
        return (type(self), self)

    @classmethod
    def quantizer(cls, stack: Sequence[WeightFormat], rows: int, device: torch.device) -> Quantizer:
        """A quantizer for ``len(stack)`` copies of a ``rows``-row weight, copy i in format ``stack[i]``."""
        raise NotImplementedError

    def codes(self, Q: torch.Tensor, params: Params) -> torch.Tensor | None:
        """The stored integer codes (uint8, [rows, cols]) of a weight ``Q`` this format produced with ``params``
        ([rows, groups] tensors); None where the format's values are not codes on a grid of those parameters."""
        return None

    def dequantize(self, codes: torch.Tensor, params: Params, dtype: torch.dtype) -> torch.Tensor:
        """The weight that ``codes`` and ``params`` stand for, computed as the serving engine's loader computes it."""
        raise NotImplementedError

    def rtn(self, W: torch.Tensor, record: Recorder | None = None,
            peers: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Round-to-nearest of ``W`` ([rows, cols]) onto this format's grid, group by group (``record``: a
        :class:`Recorder` around this format's quantizer, to keep the parameters; ``peers``: see
        :meth:`Quantizer.prepare`)."""
        rows, cols = W.shape
        quantizer = record or self.quantizer([self], rows, W.device)
        quantizer.prepare(W, peers)
        g = quantizer.group or cols
        out = torch.empty_like(W)
        for c in range(0, cols, g):
            block = W[:, c : c + g]
            out[:, c : c + g] = quantizer.round(block, quantizer.params(block))
        return out

    def rtn_recorded(self, W: torch.Tensor, peers: torch.Tensor | None = None) -> tuple[torch.Tensor, Params]:
        """:meth:`rtn` and the grid parameters it used ([rows, groups] tensors; empty for a format without)."""
        record = Recorder(self.quantizer([self], W.shape[0], W.device))
        out = self.rtn(W, record, peers)
        return out, record.stacked() if record.groups else ()


class ActFormat(Part):
    """Quantizes a layer's input activations at run time (dynamic per token or per group): no storage.

    A format with a static part (NVFP4's per-tensor input scale) is ``calibrated``: it is given the largest |x|
    the layer's input reached on the calibration windows (``state``), as llm-compressor's observer records it.
    """

    slot = "acts"
    calibrated: ClassVar[bool] = False

    def fake_quant(self, x: torch.Tensor, state: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ([..., cols]) rounded as the serving engine's loader rounds it, in ``x``'s dtype."""
        raise NotImplementedError


@dataclass(frozen=True)
class Level:
    """One compression level of a linear layer: a tuple of parts (at most one per slot), and the deployment
    format whose layout prices it (``""``: allocator's generic storage). ``Level()`` is dense."""

    parts: tuple[Part, ...] = ()
    format: str = ""

    def _slot(self, slot: str) -> Part | None:
        return next((p for p in self.parts if p.slot == slot), None)

    @property
    def prune(self) -> Pruning | None:
        """The pruning part, if any."""
        return self._slot("prune")  # type: ignore[return-value]

    @property
    def weights(self) -> WeightFormat | None:
        """The weight format, if weights are stored in fewer than 16 bits."""
        return self._slot("weights")  # type: ignore[return-value]

    @property
    def acts(self) -> ActFormat | None:
        """The activation quantization at the layer's input, if any."""
        return self._slot("acts")  # type: ignore[return-value]

    @property
    def drop(self) -> bool:
        """True when the layer is removed (its output is zero)."""
        return self._slot("drop") is not None

    @property
    def is_dense(self) -> bool:
        """True for the uncompressed level."""
        return not self.parts

    @property
    def quantized(self) -> bool:
        """True when weights are stored in a low-bit format."""
        return self.weights is not None

    @property
    def sparsity(self) -> float:
        """The fraction of weights the pruning part removes (0 without one)."""
        return self.prune.sparsity if self.prune is not None else 0.0

    @property
    def name(self) -> str:
        """The canonical short name, the inverse of :func:`allocator.levels.parse_level`."""
        if not self.parts:
            return "dense"
        tag = self.format and not any(p.native_format == self.format for p in self.parts)
        return "+".join(p.name for p in self.parts) + (f"@{self.format}" if tag else "")

    def __str__(self) -> str:
        return self.name

    # ---- costs -------------------------------------------------------------------------------------
    def pruned_per_row(self, cols: int) -> int:
        """Weights removed in each output row."""
        if self.drop:
            return cols
        return self.prune.pruned_per_row(cols) if self.prune is not None else 0

    def kept_params(self, rows: int, cols: int) -> int:
        """Non-zero weights left in a ``rows x cols`` layer."""
        return rows * (cols - self.pruned_per_row(cols))

    def storage_bits(self, rows: int, cols: int) -> int:
        """Exact generic storage in bits: kept values in the weight format (16 bits without one), the pruning
        pattern's index, the format's scales. A deployment format may store it otherwise (``allocator.formats``)."""
        if self.drop:
            return 0
        kept = self.kept_params(rows, cols)
        total = self.weights.storage_bits(rows, cols, kept) if self.weights else kept * DENSE_BITS
        return total + (self.prune.index_bits(rows, cols, kept) if self.prune else 0)

    def unfit_reason(self, rows: int, cols: int) -> str | None:
        """Why this level cannot compress a ``rows x cols`` layer, or None if it can."""
        return next((why for p in self.parts if (why := p.unfit(rows, cols))), None)

    @property
    def kernel(self) -> str:
        """The latency kernel the level runs on: one part leads (weights over pruning); a pruned and
        quantized layer has none; ``drop`` costs nothing; no kernel: ``dense``."""
        if self.drop:
            return "drop"
        if self.prune is not None and self.weights is not None:
            return "dense"
        lead = self.weights or self.prune
        return (lead.kernel(self) if lead is not None else None) or "dense"


def fmt_number(x: float) -> str:
    """A fraction as it appears in level names: ``0.5`` -> ``"0.5"``, ``0.25`` -> ``"0.25"``."""
    return f"{x:.4f}".rstrip("0").rstrip(".") if x else "0"


def compose(parts: Sequence[Part], text: str, format: str = "") -> Level:
    """A level of ``parts`` in canonical slot order, or a one-line error naming what does not combine."""
    by_slot: dict[str, Part] = {}
    for part in parts:
        if part.slot in by_slot:
            raise AllocatorError(f"level {text!r} has two {part.slot} parts ({by_slot[part.slot].name}, {part.name})")
        by_slot[part.slot] = part
    lone = next((p for p in by_slot.values() if p.alone), None)
    if lone is not None and len(by_slot) > 1:
        raise AllocatorError(f"level {text!r}: {lone.name} combines with no other part")
    if "acts" in by_slot and "weights" not in by_slot:
        raise AllocatorError(f"level {text!r}: activation quantization needs a weight format too (e.g. w8+a8)")
    ordered = tuple(by_slot[s] for s in SLOTS if s in by_slot)
    native = {p.native_format for p in ordered if p.native_format}
    if native and format and format not in native:
        raise AllocatorError(f"level {text!r} is made for {native.pop()}, not {format}")
    return Level(ordered, format or (native.pop() if native else ""))
