"""Run calibration data through a model block by block, gathering each linear's input statistics.

Memory stays at one block's activations: the inputs of block 0 are captured once, then each block
maps its inputs to the next block's. In ``sequential`` mode (the papers' default when applying a
plan) the block's layers are compressed before its outputs are recomputed, so later blocks see the
partly compressed model; otherwise (building a level database, as EvoPress does) they see dense inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from allocator.backends.stats import LayerStats
from allocator.inventory import Inventory, Layer


class _Captured(Exception):
    """Raised by the hook on block 0 once its inputs are saved: the rest of the model need not run."""


def _block_inputs(model: nn.Module, block: nn.Module, seqs: torch.Tensor, batch_size: int) -> list[tuple]:
    """(hidden, extra args, kwargs) that the model passes to ``block`` for each calibration batch."""
    captured: list[tuple] = []

    def hook(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, args[1:], kwargs))
        raise _Captured

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for i in range(0, len(seqs), batch_size):
            try:
                model(seqs[i : i + batch_size].to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _forward(block: nn.Module, batch: tuple) -> torch.Tensor:
    hidden, args, kwargs = batch
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def blockwise(
    model: nn.Module,
    inventory: Inventory,
    seqs: torch.Tensor,
    on_block: Callable[[list[Layer], dict[str, LayerStats]], None],
    sequential: bool,
    batch_size: int = 8,
    desc: str = "calibrate",
    hessian: bool = True,
    keep: int = 0,
) -> None:
    """Call ``on_block(layers, stats)`` for every decoder block, with its layers' input statistics.

    ``on_block`` compresses (or records) the block's layers; in ``sequential`` mode it must write the
    compressed weights into the model before returning. Without ``hessian`` the statistics hold column norms
    and the largest |x| only (no [cols, cols] matmul per batch); ``keep``: input rows each layer keeps.
    """
    blocks = model.get_submodule(inventory.blocks)
    batches = _block_inputs(model, blocks[0], seqs, batch_size)
    by_block: dict[int, list[Layer]] = {}
    for layer in inventory.layers:
        by_block.setdefault(layer.block, []).append(layer)
    for b in tqdm(range(inventory.n_blocks), desc=desc, leave=False):
        block, layers = blocks[b], by_block.get(b, [])
        device = next(block.parameters()).device
        stats = {layer.name: LayerStats(layer.cols, device, hessian, keep) for layer in layers}
        handles = [
            model.get_submodule(layer.name).register_forward_hook(
                lambda _m, inp, _out, s=stats[layer.name]: s.add_batch(inp[0])
            )
            for layer in layers
        ]
        try:
            outputs = [_forward(block, batch) for batch in batches]
        finally:
            for h in handles:
                h.remove()
        on_block(layers, stats)
        if sequential:
            outputs = [_forward(block, batch) for batch in batches]
        batches = [(out, args, kwargs) for out, (_, args, kwargs) in zip(outputs, batches, strict=True)]
