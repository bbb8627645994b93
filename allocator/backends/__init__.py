"""Backends apply levels to a model's weights: pruning (magnitude, Wanda, SparseGPT) and quantization (RTN, GPTQ).

Each backend compresses one ``[rows, cols]`` weight to any level of the grid: the pruning part of a
level with its pruning rule, the bit-width part by round-to-nearest or by the OBS solver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from allocator.backends.calibrate import blockwise
from allocator.backends.magnitude import magnitude_prune
from allocator.backends.obs import obs_compress, obs_compress_levels
from allocator.backends.stats import LayerStats
from allocator.backends.wanda import wanda_prune
from allocator.errors import AllocatorError
from allocator.inventory import Inventory, weight_view
from allocator.levels import Level


@dataclass(frozen=True)
class Backend:
    """A named compression rule; ``needs_data`` says whether it reads calibration statistics.

    ``compress_many`` (optional) compresses one weight to several levels at once, sharing work.
    """

    name: str
    needs_data: bool
    compress: Callable[[torch.Tensor, Level, LayerStats | None], torch.Tensor]
    about: str
    compress_many: Callable[[torch.Tensor, list[Level], LayerStats | None], list[torch.Tensor]] | None = None


def _prune_then_rtn(prune: Callable[[torch.Tensor, Level, LayerStats | None], torch.Tensor]):
    def compress(W: torch.Tensor, level: Level, stats: LayerStats | None) -> torch.Tensor:
        out = prune(W, level, stats) if level.prune is not None else W
        if level.weights is not None:
            out = level.weights.rtn(out).masked_fill(out == 0, 0)  # pruned weights stay exactly zero
        return out

    return compress


_magnitude = _prune_then_rtn(lambda W, level, _stats: magnitude_prune(W, level))
_obs = lambda W, level, stats: obs_compress(W, stats.H, level)  # noqa: E731
_obs_many = lambda W, levels, stats: obs_compress_levels(W, stats.H, levels)  # noqa: E731

BACKENDS: dict[str, Backend] = {
    "magnitude": Backend("magnitude", False, _magnitude, "prune smallest |W| per layer; bits by RTN"),
    "rtn": Backend("rtn", False, _magnitude, "round-to-nearest bits; sparsity by magnitude"),
    "wanda": Backend("wanda", True, _prune_then_rtn(wanda_prune), "prune by |W|·||X|| per row; bits by RTN"),
    "sparsegpt": Backend("sparsegpt", True, _obs, "OBS pruning (and quantization) with the input Hessian", _obs_many),
    "gptq": Backend("gptq", True, _obs, "OBS quantization (and pruning) with the input Hessian", _obs_many),
}


def get_backend(name: str) -> Backend:
    """The backend called ``name``, or a clear error listing the choices."""
    if name not in BACKENDS:
        raise AllocatorError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def compress_weight(W: torch.Tensor, level: Level, backend: Backend, stats: LayerStats | None) -> torch.Tensor:
    """The compressed copy of one weight ([rows, cols]) at ``level``; the input is not modified."""
    if level.drop:
        return torch.zeros_like(W)
    if level.is_dense:
        return W.clone()
    return backend.compress(W, level, stats).to(W.dtype)


def compress_levels(
    W: torch.Tensor, levels: list[Level], backend: Backend, stats: LayerStats | None
) -> list[torch.Tensor]:
    """:func:`compress_weight` at each of ``levels``, through the backend's shared-work path when it has one."""
    if backend.compress_many is None:
        return [compress_weight(W, level, backend, stats) for level in levels]
    out: list[torch.Tensor | None] = [None] * len(levels)
    hard = [i for i, lv in enumerate(levels) if not lv.drop and not lv.is_dense]
    for i, lv in enumerate(levels):
        if i not in hard:
            out[i] = compress_weight(W, lv, backend, stats)
    if hard:
        for i, Q in zip(hard, backend.compress_many(W, [levels[i] for i in hard], stats), strict=True):
            out[i] = Q.to(W.dtype)
    return out  # type: ignore[return-value]


@torch.no_grad()
def apply_(
    model: nn.Module,
    assignment: dict[str, Level],
    backend: str = "magnitude",
    calib: torch.Tensor | None = None,
    batch_size: int = 8,
) -> None:
    """Compress every assigned layer of ``model`` in place.

    Data-driven backends need ``calib`` token sequences; they run block by block so each block is
    calibrated on the outputs of the already compressed blocks before it. A dropped layer has weight
    and bias zeroed, so its block's residual passes its input on.
    """
    chosen = get_backend(backend)
    inventory = Inventory.from_model(model, include_lm_head=any(n.endswith("lm_head") for n in assignment))

    def write(name: str, stats: LayerStats | None) -> None:
        module = model.get_submodule(name)
        W = weight_view(module)
        W.copy_(compress_weight(W, assignment[name], chosen, stats))
        if assignment[name].drop and module.bias is not None:
            module.bias.zero_()

    if not chosen.needs_data:
        for name in tqdm(assignment, desc=f"compress ({backend})", leave=False):
            write(name, None)
        return
    if calib is None:
        raise AllocatorError(f"backend {backend!r} needs calibration sequences: pass calib (token ids)")
    outside = [n for n in assignment if inventory[n].block >= inventory.n_blocks]
    if outside:
        raise AllocatorError(f"backend {backend!r} calibrates decoder blocks only; use magnitude/rtn for {outside}")

    def on_block(layers, stats) -> None:
        for layer in layers:
            if layer.name in assignment:
                write(layer.name, stats[layer.name])

    blockwise(model, inventory, calib, on_block, sequential=True, batch_size=batch_size, desc=f"compress ({backend})")
