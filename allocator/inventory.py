"""The layer inventory: what every other part of allocator sees of a model.

The linear layers inside the decoder blocks, keyed by their ``named_modules()`` name, with shape and tie groups
(q/k/v and gate/up, which vLLM fuses and must therefore share one setting), block attention kinds and routed
experts' token shares.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from allocator.errors import AllocatorError

# Roles that serving engines fuse into one kernel: vLLM's packed_modules_mapping.
TIE_KINDS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


@dataclass(frozen=True)
class Layer:
    """One compressible linear layer: HF module name, decoder block index, role and weight shape."""

    name: str
    block: int
    role: str
    rows: int  # output features
    cols: int  # input features
    share: float = 1.0  # mean fraction of the tokens it computes on: top_k / experts for a routed expert

    @property
    def params(self) -> int:
        """Weight parameter count (bias excluded)."""
        return self.rows * self.cols


@dataclass(frozen=True)
class Inventory:
    """The compressible layers of a model and its tie groups, in ``named_modules()`` order."""

    layers: tuple[Layer, ...]
    groups: tuple[tuple[str, ...], ...]
    blocks: str  # name of the ModuleList holding the decoder blocks
    n_blocks: int
    attention: tuple[str, ...] = ()  # per block: "full" or "sliding:<window>" (Gemma-2/3 alternate them)
    tied_embeddings: bool = False  # the LM head is the input embedding's weight (one tensor, two uses)

    @classmethod
    def from_model(cls, model: nn.Module, include_lm_head: bool = False) -> Inventory:
        """Enumerate every linear inside the decoder blocks (and the LM head if asked for).

        Fused routed experts are unfused first (:mod:`allocator.moe`), so each expert's projections are
        units; routers (``gate``, ``router``, ``shared_expert_gate``) stay dense and are not listed.
        """
        from allocator.moe import unfuse_experts

        unfuse_experts(model)
        blocks_name, blocks = find_blocks(model)
        layers: list[Layer] = []
        groups: dict[str, list[str]] = {}
        for b, block in enumerate(blocks):
            shares = _expert_shares(block, model.config)
            for role, module in block.named_modules():
                if not is_linear(module) or _is_router(role):
                    continue
                name = f"{blocks_name}.{b}.{role}"
                rows, cols = weight_view(module).shape
                share = next((v for k, v in shares.items() if role.startswith(k + ".")), 1.0)
                layers.append(Layer(name, b, role, rows, cols, share))
                parent, _, leaf = name.rpartition(".")
                key = f"{parent}.{TIE_KINDS[leaf]}" if leaf in TIE_KINDS else name
                groups.setdefault(key, []).append(name)
        if include_lm_head:
            head = model.get_output_embeddings()
            if head is None or not is_linear(head):
                raise AllocatorError("this model has no linear LM head to compress: drop --include-lm-head")
            if _tied(model):
                raise AllocatorError(
                    "the LM head shares its weight with the input embedding (tie_word_embeddings): "
                    "compressing it would change the embedding too; drop --include-lm-head"
                )
            name = next(n for n, m in model.named_modules() if m is head)
            rows, cols = weight_view(head).shape
            layers.append(Layer(name, len(blocks), "lm_head", rows, cols))
            groups[name] = [name]
        attention = tuple(_attention_kind(block, b, model.config) for b, block in enumerate(blocks))
        return cls(tuple(layers), tuple(tuple(g) for g in groups.values()), blocks_name, len(blocks), attention,
                   _tied(model))  # fmt: skip

    @property
    def params(self) -> int:
        """Total compressible parameters."""
        return sum(layer.params for layer in self.layers)

    @property
    def shapes(self) -> dict[str, list[int]]:
        """Layer name -> [rows, cols]: the model fingerprint a plan carries."""
        return {layer.name: [layer.rows, layer.cols] for layer in self.layers}

    @property
    def fingerprint(self) -> str:
        """A short hash of layer names and shapes: plans made for another model are refused by it."""
        return hashlib.sha256(json.dumps(self.shapes).encode()).hexdigest()[:16]

    def __getitem__(self, name: str) -> Layer:
        return self._by_name[name]

    @cached_property
    def _by_name(self) -> dict[str, Layer]:
        return {layer.name: layer for layer in self.layers}


def _is_router(role: str) -> bool:
    """A mixture-of-experts router: it picks experts per token, so it is never compressed."""
    leaf = role.rpartition(".")[2]
    return leaf in ("gate", "router") or leaf.endswith("_gate")


def _tied(model: nn.Module) -> bool:
    """Whether the output head holds the very tensor of the input embedding (read from the modules)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and head.weight is embed.weight


def _expert_shares(block: nn.Module, config: object) -> dict[str, float]:
    """Routed experts module name -> top_k / experts: on average each expert sees that share of the tokens.

    ``top_k`` is read from the block's router (the sibling module that has one), else from the config.
    """
    from allocator.moe import UnfusedExperts

    shares = {}
    for role, module in block.named_modules():
        if isinstance(module, UnfusedExperts):
            parent = block.get_submodule(role.rpartition(".")[0]) if "." in role else block
            top_k = next((m.top_k for m in parent.modules() if isinstance(getattr(m, "top_k", None), int)), None)
            top_k = top_k or getattr(config, "num_experts_per_tok", None) or len(module)
            shares[role] = min(1.0, top_k / len(module))
    return shares


def _attention_kind(block: nn.Module, index: int, config: object) -> str:
    """``full`` or ``sliding:<window>``: the attention module's own ``sliding_window`` where it has one
    (Gemma-2/3, Qwen2), else ``config.layer_types``, else a model-wide ``config.sliding_window`` (Mistral)."""
    window = getattr(config, "sliding_window", None)
    for module in block.modules():
        if hasattr(module, "sliding_window") and module is not block:
            own = module.sliding_window
            return f"sliding:{own}" if isinstance(own, int) and own > 0 else "full"
    types = getattr(config, "layer_types", None)
    if types and index < len(types):
        kind = str(types[index])
        if kind == "sliding_attention":
            return f"sliding:{window}"
        return "full" if kind == "full_attention" else kind
    on = getattr(config, "use_sliding_window", True) is not False
    return f"sliding:{window}" if isinstance(window, int) and window > 0 and on else "full"


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ModuleList of decoder blocks: the one whose length is ``config.num_hidden_layers``."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and len(module) > 0:
            return name, module
    raise AllocatorError(
        f"cannot find the decoder blocks of {type(model).__name__}: no ModuleList of "
        f"config.num_hidden_layers={n} modules; this architecture is not supported yet"
    )


def is_linear(module: nn.Module) -> bool:
    """True for nn.Linear and GPT-2-style Conv1D (a linear with a transposed weight)."""
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def weight_view(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The weight (or ``weight``, a tensor of its shape such as a host copy) as a ``[out_features, in_features]``
    view; writes into it change the module (or ``weight``)."""
    w = module.weight.data if weight is None else weight
    return w.t() if type(module).__name__ == "Conv1D" else w
