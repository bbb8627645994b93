"""Model shapes without weights: latency depends on shapes only, so tables need no checkpoint.

``config_for`` takes a preset name (the Llama-3-8B and SmolLM2-135M shapes, usable offline), a
``.gguf`` file, a local folder or a hub id; ``random_model`` builds the architecture with random
weights on the target device for end-to-end timing.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from allocator.errors import AllocatorError, first_line

PRESETS: dict[str, dict] = {
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
}  # fmt: skip


def config_for(spec: str):
    """A transformers config for a preset name, ``.gguf`` file, local folder or hub id."""
    from transformers import AutoConfig, LlamaConfig

    if spec in PRESETS:
        return LlamaConfig(**PRESETS[spec])
    path = Path(spec).expanduser()
    try:
        if spec.endswith(".gguf"):
            return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        return AutoConfig.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise AllocatorError(
            f"cannot read a model config from {spec!r} ({first_line(exc, 120)}): pass a preset "
            f"({', '.join(PRESETS)}), a .gguf file, a model folder or a reachable hub id"
        ) from None


def meta_model(config) -> nn.Module:
    """The architecture on the meta device (shapes only, no memory): enough for an Inventory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def random_model(config, dtype: torch.dtype, device: str) -> nn.Module:
    """The architecture with random weights on ``device`` (timing needs shapes, not trained values)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
