"""Compress every layer at every level in one calibration pass on dense inputs.

The level database and the sensitivity profiles both need each layer compressed at each level
from the same statistics; this pass feeds them, one decoder block at a time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from allocator.backends import compress_levels, get_backend, tie_absmax
from allocator.backends.calibrate import blockwise
from allocator.backends.stats import LayerStats
from allocator.errors import AllocatorError
from allocator.formats import unfit
from allocator.inventory import Inventory, Layer, weight_view
from allocator.levels import Level
from allocator.levels.quantizer import Params

ACT_SAMPLE = 1024  # input rows per layer on which a level's activation quantization error is measured
# visit(layer, level, W, Q, stats, params): W the dense weight, Q its compressed copy (both [rows, cols]), params
# the grid parameters of Q's weight format ([rows, groups] tensors; empty without one)
Visitor = Callable[[Layer, Level, torch.Tensor, torch.Tensor, LayerStats, Params], None]


@torch.no_grad()
def for_each_level(
    model: nn.Module,
    inventory: Inventory,
    levels: list[Level],
    backend: str,
    calib: torch.Tensor,
    visit: Visitor,
    on_block: Callable[[list[Layer], dict[str, LayerStats]], None] | None = None,
    batch_size: int = 8,
    desc: str = "levels",
) -> None:
    """Call ``visit`` for every (layer, applicable level); ``on_block`` after each decoder block."""
    chosen = get_backend(backend)
    outside = [lay.name for lay in inventory.layers if lay.block >= inventory.n_blocks]
    if outside:
        raise AllocatorError(f"per-level passes cover decoder blocks only; drop {outside} from the inventory")

    peers = tie_absmax(model, inventory, levels)

    def block_done(layers: list[Layer], stats: dict[str, LayerStats]) -> None:
        for layer in layers:
            W = weight_view(model.get_submodule(layer.name))
            fits = [level for level in levels if unfit(level, layer.rows, layer.cols) is None]
            compressed = compress_levels(W, fits, chosen, stats[layer.name], peers.get(layer.name))
            for level, (Q, params) in zip(fits, compressed, strict=True):
                visit(layer, level, W, Q, stats[layer.name], params)
        if on_block is not None:
            on_block(layers, stats)

    keep = ACT_SAMPLE if any(lv.acts is not None for lv in levels) else 0  # rows to measure activation noise on
    blockwise(model, inventory, calib, block_done, sequential=False, batch_size=batch_size, desc=desc, keep=keep)
