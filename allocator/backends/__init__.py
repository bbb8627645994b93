"""Backends apply levels to a model's weights: pruning (magnitude, Wanda, SparseGPT) and quantization (RTN, GPTQ).

Each backend compresses one ``[rows, cols]`` weight to any level of the grid: the pruning part of a
level with its pruning rule, the weight format by round-to-nearest or by the OBS solver. Each returns the
compressed weight and the grid parameters its weight format used (scales, zero points: [rows, groups]
tensors, empty without a format), which the level database and the checkpoint writers store beside the codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from allocator.backends.calibrate import blockwise
from allocator.backends.magnitude import magnitude_prune, magnitude_score
from allocator.backends.masks import prune_masks
from allocator.backends.obs import obs_compress_levels
from allocator.backends.stats import LayerStats
from allocator.backends.wanda import wanda_prune, wanda_score
from allocator.errors import AllocatorError
from allocator.inventory import Inventory, weight_view
from allocator.levels import Level
from allocator.levels.quantizer import Params

Compressed = tuple[torch.Tensor, Params]  # a compressed weight and its grid parameters


@dataclass(frozen=True)
class Backend:
    """A named compression rule; ``needs_data`` says whether it reads calibration statistics.

    ``compress_many`` (optional) compresses one weight to several levels at once, sharing work.
    """

    name: str
    needs_data: bool
    compress: Callable[..., Compressed]  # (W, level, stats, peers) -> the compressed weight and its grid
    about: str
    compress_many: Callable[..., list[Compressed]] | None = None  # (W, levels, stats, peers): sharing work
    hessian: bool = False  # reads the input Gram matrix H (OBS), not only the column norms


def _rtn_after(pruned: torch.Tensor, level: Level, peers) -> Compressed:
    if level.weights is None:
        return pruned, ()
    Q, params = level.weights.rtn_recorded(pruned, peers)
    return Q.masked_fill(pruned == 0, 0), params  # pruned weights stay exactly zero


def _prune_then_rtn(prune: Callable[[torch.Tensor, Level, LayerStats | None], torch.Tensor]):
    def compress(W: torch.Tensor, level: Level, stats: LayerStats | None, peers=None) -> Compressed:
        return _rtn_after(prune(W, level, stats) if level.prune is not None else W, level, peers)

    return compress


def _prune_then_rtn_many(score: Callable[[torch.Tensor, LayerStats | None], torch.Tensor], per_row: bool):
    """The same weights as :func:`_prune_then_rtn` at many levels: the score computed and sorted once."""

    def compress_many(W: torch.Tensor, levels: list[Level], stats: LayerStats | None, peers=None) -> list[Compressed]:
        masks = prune_masks(score(W, stats), levels, per_row)
        return [_rtn_after(W if m is None else W.masked_fill(m, 0), lv, peers)
                for lv, m in zip(levels, masks, strict=True)]  # fmt: skip

    return compress_many


_magnitude = _prune_then_rtn(lambda W, level, _stats: magnitude_prune(W, level))
_magnitude_many = _prune_then_rtn_many(magnitude_score, per_row=False)
_obs = lambda W, level, stats, peers=None: obs_compress_levels(W, stats.H, [level], peers=peers)[0]  # noqa: E731
_obs_many = lambda W, levels, stats, peers=None: obs_compress_levels(W, stats.H, levels, peers=peers)  # noqa: E731

BACKENDS: dict[str, Backend] = {
    "magnitude": Backend("magnitude", False, _magnitude, "prune smallest |W| per layer; bits by RTN", _magnitude_many),
    "rtn": Backend("rtn", False, _magnitude, "round-to-nearest bits; sparsity by magnitude", _magnitude_many),
    "wanda": Backend(
        "wanda",
        True,
        _prune_then_rtn(wanda_prune),
        "prune by |W|·||X|| per row; bits by RTN",
        _prune_then_rtn_many(wanda_score, per_row=True),
    ),  # fmt: skip
    "sparsegpt": Backend(
        "sparsegpt", True, _obs, "OBS pruning (and quantization) with the input Hessian", _obs_many, hessian=True
    ),
    "gptq": Backend(
        "gptq", True, _obs, "OBS quantization (and pruning) with the input Hessian", _obs_many, hessian=True
    ),  # fmt: skip
}


def get_backend(name: str) -> Backend:
    """The backend called ``name``, or a clear error listing the choices."""
    if name not in BACKENDS:
        raise AllocatorError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]


def compress_recorded(W: torch.Tensor, level: Level, backend: Backend, stats: LayerStats | None,
                      peers: torch.Tensor | None = None) -> Compressed:  # fmt: skip
    """The compressed copy of one weight ([rows, cols]) at ``level`` and its grid parameters; ``W`` is kept.
    ``peers``: the largest |w| of the layer's tie group, for formats whose per-tensor scale the group shares."""
    if level.drop:
        return torch.zeros_like(W), ()
    if level.is_dense:
        return W.clone(), ()
    Q, params = backend.compress(W, level, stats, peers)
    return Q.to(W.dtype), params


def compress_weight(W: torch.Tensor, level: Level, backend: Backend, stats: LayerStats | None) -> torch.Tensor:
    """The compressed copy of one weight ([rows, cols]) at ``level``; the input is not modified."""
    return compress_recorded(W, level, backend, stats)[0]


def compress_levels(W: torch.Tensor, levels: list[Level], backend: Backend, stats: LayerStats | None,
                    peers: torch.Tensor | None = None) -> list[Compressed]:  # fmt: skip
    """:func:`compress_recorded` at each of ``levels``, through the backend's shared-work path when it has one."""
    if backend.compress_many is None:
        return [compress_recorded(W, level, backend, stats, peers) for level in levels]
    out: list[Compressed | None] = [None] * len(levels)
    hard = [i for i, lv in enumerate(levels) if not lv.drop and not lv.is_dense]
    for i, lv in enumerate(levels):
        if i not in hard:
            out[i] = compress_recorded(W, lv, backend, stats)
    if hard:
        many = backend.compress_many(W, [levels[i] for i in hard], stats, peers)
        for i, (Q, params) in zip(hard, many, strict=True):
            out[i] = (Q.to(W.dtype), params)
    return out  # type: ignore[return-value]


@torch.no_grad()
def apply_(
    model: nn.Module,
    assignment: dict[str, Level],
    backend: str = "magnitude",
    calib: torch.Tensor | None = None,
    batch_size: int = 8,
    sequential: bool = False,
    record: dict[str, Params] | None = None,
    stats: dict[str, LayerStats] | None = None,
) -> None:
    """Compress every assigned layer of ``model`` in place; ``record`` receives each layer's grid parameters.

    Data-driven backends need ``calib`` token sequences and run block by block, each layer calibrated on the
    dense model's activations, as the level database and every search see it (so a plan applied here is the
    plan they measured), or with ``sequential`` on the outputs of the already compressed blocks before it (the
    SparseGPT/GPTQ papers' way). ``stats``: the layers' dense-input statistics if already gathered (a backend
    that needs no Hessian then runs no calibration pass at all). A dropped layer has weight and bias zeroed, so
    its block's residual passes its input on.
    """
    chosen = get_backend(backend)
    inventory = Inventory.from_model(model, include_lm_head=any(n.endswith("lm_head") for n in assignment))

    peers = tie_absmax(model, inventory, list(assignment.values()))

    def write(name: str, stats: LayerStats | None) -> None:
        module = model.get_submodule(name)
        W = weight_view(module)
        Q, params = compress_recorded(W, assignment[name], chosen, stats, peers.get(name))
        W.copy_(Q)
        if record is not None and params:
            record[name] = params
        if assignment[name].drop and module.bias is not None:
            module.bias.zero_()

    if not chosen.needs_data or (stats is not None and not sequential and not chosen.hessian):
        for name in tqdm(assignment, desc=f"compress ({backend})", leave=False):
            write(name, stats[name] if chosen.needs_data else None)
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

    blockwise(model, inventory, calib, on_block, sequential=sequential, batch_size=batch_size,
              desc=f"compress ({backend})", hessian=chosen.hessian)  # fmt: skip


@torch.no_grad()
def tie_absmax(model: nn.Module, inventory: Inventory, levels: list[Level]) -> dict[str, torch.Tensor]:
    """Per layer, the largest |w| over its tie group's dense weights (q/k/v, gate/up: what vLLM fuses), where a
    level's format shares a per-tensor scale across the group (NVFP4's global scale); empty where none does."""
    if not any(lv.weights is not None and lv.weights.tied_scale for lv in levels):
        return {}
    out = {}
    for group in inventory.groups:
        peak = torch.stack([weight_view(model.get_submodule(n)).abs().max().float() for n in group]).max()
        out.update(dict.fromkeys(group, peak))
    return out
