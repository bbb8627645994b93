"""A SmolLM2 whose weights lie on no quantization grid, computing exactly the same function as the embedded one.

The only offline SmolLM2 is a Q4_1 GGUF: every weight lies on llama.cpp's Q4_1 grid, so re-quantizing it to Q4_1 is
lossless and no mixed plan can beat uniform Q4_1 on it. Llama blocks have exact scaling symmetries; each block gets
seeded log-normal channel scales s (sigma --sigma) through all four of them:
- attention norm weight / s, and q, k, v input columns * s;
- MLP norm weight / s, and gate, up input columns * s;
- v output rows * s, and o input columns (every query head of that KV head) / s;
- up output rows * s, and down input columns / s (silu(gate) * up is linear in up).
The model's outputs do not change (up to fp16 rounding of the stored weights; the dense perplexities are checked),
but every linear layer's columns are rescaled, so its 32-weight blocks no longer lie on any grid - as in a model
released in 16 bits, whose input channels differ in scale.

C4 is split by document: the first 90 % is written as OUT/c4-calib.parquet (what allocator calibrates on), the last
10 % as OUT/c4-heldout.txt (a second evaluation text, never calibrated on). Writes OUT/hf (fp16 safetensors: what
allocator loads) and, with --template F16.gguf (the embedded model through scripts/gguf_to_f16.py), OUT/f16.gguf:
the template's metadata and tokenizer with these weights (q/k rows permuted to llama.cpp's rotary layout), the
source llama-quantize reads. Usage:
    python scripts/offgrid_model.py --out /tmp/offgrid --template /tmp/f16.gguf
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gguf
import numpy as np
import pandas as pd
import torch
from gguf_to_f16 import rewrite  # scripts/ (beside this file)

from allocator.data import default_calibration, evaluation_sequences
from allocator.evaluate import perplexity
from allocator.model import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2 (a .gguf path works too)")
    ap.add_argument("--c4", default=default_calibration(), help="the C4 sample (.parquet)")
    ap.add_argument("--sigma", type=float, default=0.4, help="log-normal spread of the channel scales")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--template", help="the embedded model as F16 GGUF: also write OUT/f16.gguf with these weights")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = pd.read_parquet(args.c4, columns=["text"])["text"].tolist()
    cut = len(docs) * 9 // 10
    pd.DataFrame({"text": docs[:cut]}).to_parquet(out / "c4-calib.parquet")
    (out / "c4-heldout.txt").write_text("\n".join(d.replace("\n", " ") for d in docs[cut:]) + "\n")

    loaded = load_model(args.model, torch.float32)
    model, tok = loaded.model, loaded.tokenizer
    windows = evaluation_sequences(tok, ["\n\n".join(docs[cut:])], 512, 8)
    before = perplexity(model, windows, batch_size=4)
    rescale(model, args.sigma, np.random.default_rng(args.seed))
    model.half().float()  # as stored (fp16), for the check
    after = perplexity(model, windows, batch_size=4)
    print(json.dumps({"c4_heldout_ppl_before": before, "after": after}))
    model.config.torch_dtype = "float16"
    model.half().save_pretrained(out / "hf")
    tok.save_pretrained(out / "hf")
    (out / "rescale.json").write_text(json.dumps({**vars(args), "ppl_before": before, "ppl_after": after}, indent=1))
    if args.template:
        write_gguf(model, args.template, out / "f16.gguf")


@torch.no_grad()
def rescale(model: torch.nn.Module, sigma: float, rng: np.random.Generator) -> None:
    """Apply the four exact channel-scale symmetries of every Llama block (see the module docstring)."""
    config = model.config
    head = config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // config.num_key_value_heads

    def scales(n: int) -> torch.Tensor:
        return torch.from_numpy(np.exp(sigma * rng.standard_normal(n))).float()

    for block in model.model.layers:
        att, mlp = block.self_attn, block.mlp
        s = scales(config.hidden_size)
        block.input_layernorm.weight.div_(s)
        for lin in (att.q_proj, att.k_proj, att.v_proj):
            lin.weight.mul_(s)
        s = scales(config.hidden_size)
        block.post_attention_layernorm.weight.div_(s)
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight.mul_(s)
        s = scales(att.v_proj.weight.shape[0])  # [kv heads * head dim]
        att.v_proj.weight.mul_(s[:, None])
        att.o_proj.weight.div_(s.view(-1, 1, head).expand(-1, group, head).reshape(-1))
        s = scales(mlp.up_proj.weight.shape[0])
        mlp.up_proj.weight.mul_(s[:, None])
        mlp.down_proj.weight.div_(s)


def rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """HF's q/k rows in llama.cpp's order (convert_hf_to_gguf's permute; transformers undoes it when loading)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model: torch.nn.Module, template: str, dst: Path) -> None:
    """``template`` (metadata, tokenizer, tensor order) with ``model``'s weights as F16 (norms stay F32)."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    weights = {}
    for hf, tensor in model.state_dict().items():
        name = names.get_name(hf.removesuffix(".weight"))
        if name is None:
            continue
        w = tensor.float().cpu().numpy()
        if hf.endswith("q_proj.weight"):
            w = rotary_rows(w, config.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            w = rotary_rows(w, config.num_key_value_heads)
        weights[f"{name}.weight"] = w
    kept = [t.name for t in gguf.GGUFReader(template).tensors if t.name not in weights]
    if kept:
        raise SystemExit(f"no weight for template tensors {kept}")

    def replaced(t) -> np.ndarray:
        old = np.asarray(t.data)
        assert weights[t.name].shape == old.shape, (t.name, weights[t.name].shape, old.shape)
        return np.asarray(weights[t.name], dtype=old.dtype)

    rewrite(template, dst, replaced)


if __name__ == "__main__":
    main()
