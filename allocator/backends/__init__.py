"""Backends apply a plan's levels to a model's weights, in place."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from allocator.backends.magnitude import magnitude_prune
from allocator.errors import AllocatorError
from allocator.levels import Level
from allocator.model import weight_view

# name -> function(W [rows, cols], level) -> compressed W. Data-free backends only, for now.
BACKENDS: dict[str, Callable[[torch.Tensor, Level], torch.Tensor]] = {"magnitude": magnitude_prune}


def check_backend(name: str, levels: list[Level]) -> None:
    """Raise if ``name`` is unknown or cannot produce one of ``levels``."""
    if name not in BACKENDS:
        raise AllocatorError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    quantized = sorted({lv.name for lv in levels if lv.quantized})
    if quantized:
        raise AllocatorError(f"backend {name!r} prunes only; levels {quantized} need a quantization backend")


@torch.no_grad()
def apply_(model: nn.Module, assignment: dict[str, Level], backend: str = "magnitude") -> None:
    """Compress every assigned layer of ``model`` in place with ``backend``.

    A dropped layer has its weight and bias zeroed, so its block's residual passes its input on.
    """
    check_backend(backend, list(assignment.values()))
    compress = BACKENDS[backend]
    for name, level in tqdm(assignment.items(), desc=f"compress ({backend})", leave=False):
        module = model.get_submodule(name)
        W = weight_view(module)
        if level.drop:
            W.zero_()
            if module.bias is not None:
                module.bias.zero_()
        elif level.kind != "dense":
            W.copy_(compress(W, level))
