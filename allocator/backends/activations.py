"""Activation quantization in every model run that decides something: each linear's input fake-quantized as its
level's activation format says (``fp8+afp8``, ``w8+a8``, ``nvfp4+anvfp4``), so a plan's figures are the served
model's, activations included. A weight-only level installs nothing and costs nothing.

The hooks live on the model (one forward pre-hook per layer that quantizes its input), set together with the
weights: by a backend's compression, by a level-database decode, and removed when the dense weights come back.
"""

from __future__ import annotations

import torch
from torch import nn

from allocator.levels import Level

_HOOKS = "_allocator_activation_hooks"  # model attribute: layer name -> its hook handle


def set_activations_(model: nn.Module, assignment: dict[str, Level], state: dict[str, torch.Tensor]) -> None:
    """Install each assigned layer's input quantization (and remove it where its level has none). ``state``: per
    layer the calibrated largest |x| of its input, for formats with a static part (NVFP4's global scale)."""
    hooks: dict = model.__dict__.setdefault(_HOOKS, {})
    for name, level in assignment.items():
        if name in hooks:
            hooks.pop(name).remove()
        acts = level.acts
        if acts is None:
            continue
        calibrated = state.get(name) if acts.calibrated else None

        def quantize(_module, args, acts=acts, calibrated=calibrated):
            return (acts.fake_quant(args[0], calibrated), *args[1:])

        hooks[name] = model.get_submodule(name).register_forward_pre_hook(quantize)


def clear_activations_(model: nn.Module) -> None:
    """Remove every input quantization (the dense model)."""
    for handle in model.__dict__.pop(_HOOKS, {}).values():
        handle.remove()


def needs_state(levels: list[Level]) -> bool:
    """Whether any of ``levels`` quantizes activations with a calibrated static scale."""
    return any(lv.acts is not None and lv.acts.calibrated for lv in levels)
