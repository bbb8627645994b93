"""A SmolLM2 whose weights were never quantized: the embedded model, trained on for a few hundred steps.

The only offline SmolLM2 is a Q4_1 GGUF: every weight lies on llama.cpp's Q4_1 grid, so re-quantizing it to
Q4_1 is lossless and no mixed plan can beat uniform Q4_1 on it. Fine-tuning (AdamW, bf16 autocast, C4 documents
that calibration will not see) moves the weights off every grid, as in a model released in 16 bits.

Writes OUT/hf (fp16 safetensors: what allocator loads), OUT/c4-calib.parquet (the other C4 documents: what
allocator calibrates on) and, with --convert, OUT/f16.gguf through llama.cpp's convert_hf_to_gguf.py
(the source llama-quantize reads). Usage:
    python scripts/offgrid_model.py --out /tmp/offgrid --steps 200 --convert /path/to/llama.cpp
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from allocator.data import default_calibration
from allocator.model import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--convert", help="a llama.cpp source tree: also write OUT/f16.gguf with its converter")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)

    docs = pd.read_parquet(default_calibration(), columns=["text"])["text"].tolist()
    half = len(docs) // 2
    pd.DataFrame({"text": docs[:half]}).to_parquet(out / "c4-calib.parquet")  # calibration: never trained on
    loaded = load_model(None, torch.float32)
    model, tok = loaded.model, loaded.tokenizer
    ids = torch.tensor([t for d in docs[half:] for t in tok(d + "\n\n")["input_ids"]])
    windows = ids[: len(ids) // args.seq_len * args.seq_len].view(-1, args.seq_len)
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(args.seed))

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    model.train()
    log, start = [], time.time()
    for step in range(args.steps):
        batch = windows[order[(step * args.batch + torch.arange(args.batch)) % len(windows)]]
        for group in opt.param_groups:  # linear warm-up over the first 10 % of steps
            group["lr"] = args.lr * min(1.0, (step + 1) / max(1, args.steps // 10))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        log.append({"step": step, "loss": float(loss), "s": round(time.time() - start, 1)})
        if step % 10 == 0 or step == args.steps - 1:
            print(json.dumps(log[-1]), flush=True)
    model.eval()
    model.config.torch_dtype = "float16"
    model.half().save_pretrained(out / "hf")
    tok.save_pretrained(out / "hf")
    (out / "train_log.json").write_text(json.dumps({"args": vars(args), "log": log}, indent=1))
    if args.convert:
        converter = Path(args.convert) / "convert_hf_to_gguf.py"
        subprocess.run([sys.executable, str(converter), str(out / "hf"), "--outtype", "f16",
                        "--outfile", str(out / "f16.gguf")], check=True)  # fmt: skip


if __name__ == "__main__":
    main()
