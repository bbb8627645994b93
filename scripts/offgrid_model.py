"""A SmolLM2 whose weights were never quantized: the embedded model, trained on for a few hundred steps.

The only offline SmolLM2 is a Q4_1 GGUF: every weight lies on llama.cpp's Q4_1 grid, so re-quantizing it to
Q4_1 is lossless and no mixed plan can beat uniform Q4_1 on it. Fine-tuning (AdamW, bf16 autocast, C4 documents
that calibration will not see) moves the weights off every grid, as in a model released in 16 bits.

C4 is split by document: the first half is written as OUT/c4-calib.parquet (what allocator calibrates on), the
next 40 % trains, the last 10 % is OUT/c4-heldout.txt (a second evaluation text, never calibrated or trained on).
Writes OUT/hf (fp16 safetensors: what allocator loads) and, with --template F16.gguf (the embedded model through
scripts/gguf_to_f16.py), OUT/f16.gguf: the template's metadata and tokenizer with the trained weights (q/k rows
permuted back to llama.cpp's rotary layout), the source llama-quantize reads.
Usage (a GPU makes it a minute; 2 CPU cores need hours):
    python scripts/offgrid_model.py --out /tmp/offgrid --steps 200 --template /tmp/f16.gguf --device cuda
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import gguf
import numpy as np
import pandas as pd
import torch

from allocator.data import default_calibration
from allocator.model import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2 (a .gguf path works too)")
    ap.add_argument("--c4", default=default_calibration(), help="the C4 sample (.parquet)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--template", help="the embedded model as F16 GGUF: also write OUT/f16.gguf with these weights")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    docs = pd.read_parquet(args.c4, columns=["text"])["text"].tolist()
    half, train_end = len(docs) // 2, len(docs) * 9 // 10
    pd.DataFrame({"text": docs[:half]}).to_parquet(out / "c4-calib.parquet")  # calibration: never trained on
    (out / "c4-heldout.txt").write_text("\n".join(d.replace("\n", " ") for d in docs[train_end:]) + "\n")
    loaded = load_model(args.model, torch.float32, args.device)
    model, tok = loaded.model, loaded.tokenizer
    ids = torch.tensor([t for d in docs[half:train_end] for t in tok(d + "\n\n")["input_ids"]])
    windows = ids[: len(ids) // args.seq_len * args.seq_len].view(-1, args.seq_len)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(args.seed))

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    log, start = [], time.time()
    for step in range(args.steps):
        batch = windows[order[(step * args.batch + torch.arange(args.batch)) % len(windows)]].to(args.device)
        for group in opt.param_groups:  # linear warm-up over the first 10 % of steps
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.steps // 10))
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.append({"step": step, "loss": loss.item(), "s": round(time.time() - start, 1)})
        if step % 10 == 0 or step == args.steps - 1:
            print(json.dumps(log[-1]), flush=True)
    model.eval()
    model.config.torch_dtype = "float16"
    model.half().save_pretrained(out / "hf")
    tok.save_pretrained(out / "hf")
    (out / "train_log.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=1))
    if args.template:
        write_gguf(model, args.template, out / "f16.gguf")


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
    reader = gguf.GGUFReader(template)
    kept = [t.name for t in reader.tensors if t.name not in weights]
    if kept:
        raise SystemExit(f"no trained weight for template tensors {kept}")
    writer = gguf.GGUFWriter(dst, reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)  # fmt: skip
    for t in reader.tensors:
        old = np.asarray(t.data)
        new = weights[t.name]
        assert new.shape == old.shape, (t.name, new.shape, old.shape)
        writer.add_tensor(t.name, np.asarray(new, dtype=old.dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
