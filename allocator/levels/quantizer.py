"""How a weight format's values are rounded and stored: grid parameters per group of input columns.

A :class:`Quantizer` rounds a weight onto a format's grid group by group (what round-to-nearest applies once and
GPTQ column by column); its parameters (scales, zero points, global scales) are what a checkpoint stores beside
the integer codes, kept by a :class:`Recorder` while the backend runs.
"""

from __future__ import annotations

from typing import Protocol

import torch

Params = tuple[torch.Tensor, ...]  # a group's grid parameters: [rows, 1] tensors (scale, zero point, …)


class Quantizer(Protocol):
    """Rounds a weight onto a format's grid, group by group of input columns (what RTN and GPTQ drive).

    Made for a stack of weights (several levels' copies of one weight along rows, ``rows`` each); ``prepare``
    sees the whole stacked weight once (per-tensor scales), ``params`` one group of columns of every row.
    """

    group: int  # input columns sharing one set of grid parameters (0: the whole row)

    def prepare(self, W: torch.Tensor, peers: torch.Tensor | None = None) -> None:
        """See the whole weight once: per-tensor scales. ``peers`` is the largest |w| over the layer's tie group
        (the layers a serving engine fuses with it, whose per-tensor scales must agree), None for W's own."""

    def params(self, block: torch.Tensor) -> Params: ...

    def round(self, x: torch.Tensor, params: Params) -> torch.Tensor: ...


class Recorder:
    """A quantizer that keeps every group's parameters, in column order: what a checkpoint and the level
    database store beside the codes (concatenated by :meth:`stacked` into [rows, groups] tensors).

    ``dtype``: the dtype the weight is stored in; parameters are rounded to it before they are used (GPTQ runs in
    float32), so the stored scale is the one the values were rounded with and a loader's dequantization is exact.
    """

    def __init__(self, quantizer: Quantizer, dtype: torch.dtype | None = None) -> None:
        self.quantizer, self.group, self.dtype, self.groups = quantizer, quantizer.group, dtype, []

    def prepare(self, W: torch.Tensor, peers: torch.Tensor | None = None) -> None:
        if self.dtype is not None:  # per-tensor scales computed as they are for a weight stored in this dtype
            W = W.to(self.dtype)
            peers = None if peers is None else peers.to(self.dtype)
        self.quantizer.prepare(W, peers)

    def params(self, block: torch.Tensor) -> Params:
        params = self.quantizer.params(block)
        if self.dtype is not None:
            params = tuple(p.to(self.dtype).to(p.dtype) for p in params)
        self.groups.append(params)
        return params

    def round(self, x: torch.Tensor, params: Params) -> torch.Tensor:
        return self.quantizer.round(x, params)

    def stacked(self) -> Params:
        """Each parameter over all groups: [rows, groups] tensors."""
        return tuple(torch.cat(parts, dim=1) for parts in zip(*self.groups, strict=True))


def by_column(params: Params, group: int, cols: int) -> Params:
    """[rows, groups] parameters repeated for every column of their group: [rows, cols]."""
    return tuple(p.repeat_interleave(group or cols, dim=1)[:, :cols] for p in params)


def exact_codes(guess: torch.Tensor, Q: torch.Tensor, decode, top: int) -> torch.Tensor:
    """Integer codes (uint8) that decode to ``Q`` exactly: ``guess`` rounded, and where a value falls a hair off
    (16-bit quotients of large codes), its neighbour; None-free by construction, checked by the caller."""
    codes = guess.round().clamp(0, top)
    for step in (1, -1):
        wrong = decode(codes) != Q
        if not wrong.any():
            break
        codes = torch.where(wrong, (codes + step).clamp(0, top), codes)
    return codes.to(torch.uint8)
