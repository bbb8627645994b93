"""Mixture-of-experts models: routed experts as one linear per expert and projection.

transformers stores a block's routed experts as fused 3-D tensors (``gate_up_proj`` [E, 2I, H] and
``down_proj`` [E, H, I]; Mixtral, Qwen2/3-MoE, OLMoE, ...), which no per-linear machinery can see. Unfused
into ``experts.<e>.gate_up_proj`` / ``experts.<e>.down_proj`` ``nn.Linear`` modules, every expert is a
unit like any other: its own level, its own calibration statistics (the tokens routed to it, through the
same forward hooks) and its own cost in the budget. The forward is transformers' eager expert loop with
the same ``F.linear`` calls, so outputs are unchanged. :func:`fuse_experts` restores the fused layout
before a checkpoint is saved, so transformers reloads it.
"""

from __future__ import annotations

import torch
from torch import nn


class _Expert(nn.Module):
    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor) -> None:
        super().__init__()
        self.gate_up_proj = _linear(gate_up)
        self.down_proj = _linear(down)


def _linear(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    layer.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
    return layer


class UnfusedExperts(nn.ModuleList):
    """A fused experts module as a list of experts, each with ``gate_up_proj`` and ``down_proj`` linears
    (named ``...mlp.experts.<e>.gate_up_proj``)."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__(_Expert(g, d) for g, d in zip(fused.gate_up_proj, fused.down_proj, strict=True))
        self.num_experts = len(self)
        fused.gate_up_proj.data, fused.down_proj.data = _empty(fused.gate_up_proj), _empty(fused.down_proj)
        self._fused = [fused]  # kept out of the module tree: its class is what a checkpoint must hold

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        # one class more than experts, as transformers does: an index of num_experts marks a dropped slot
        routed = torch.nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
        for e in torch.greater(routed[: self.num_experts].sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
            slot, token = torch.where(routed[e])
            gate, up = self[e].gate_up_proj(hidden_states[token]).chunk(2, dim=-1)
            h = self[e].down_proj(self._fused[0].act_fn(gate) * up) * top_k_weights[token, slot, None]
            out.index_add_(0, token, h.to(out.dtype))
        return out

    def fused(self) -> nn.Module:
        """The original module with the current (possibly compressed) expert weights stacked back."""
        fused = self._fused[0]
        fused.gate_up_proj.data = torch.stack([e.gate_up_proj.weight.data for e in self])
        fused.down_proj.data = torch.stack([e.down_proj.weight.data for e in self])
        return fused


def _empty(param: torch.Tensor) -> torch.Tensor:
    return param.data.new_empty(0)


def _is_fused_experts(module: nn.Module) -> bool:
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    plain = not any(hasattr(module, f"{p}_bias") for p in ("gate_up_proj", "down_proj"))  # biased experts: not yet
    return (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter) and gate_up.dim() == 3
            and down.dim() == 3 and hasattr(module, "act_fn") and plain)  # fmt: skip


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module of ``model`` by :class:`UnfusedExperts` (idempotent); how many."""
    targets = [(name, m) for name, m in model.named_modules() if _is_fused_experts(m)]
    for name, module in targets:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, UnfusedExperts(module))
    return len(targets)


def fuse_experts(model: nn.Module) -> int:
    """Put the fused modules back (with the current weights), as transformers saves and loads them."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, UnfusedExperts)]
    for name, module in targets:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, module.fused())
    return len(targets)
