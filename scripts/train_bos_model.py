"""Train the tiny BOS-trained model that tests/test_data.py evaluates with and without BOS (issue 15).

    python scripts/train_bos_model.py --out tests/data/bos-llama

No BOS-trained checkpoint is available offline, so this makes one as Gemma and Llama-3 were made: every
training window starts with ``<bos>``. A 2-block Llama (vocabulary of the test word tokenizer) learns
sentences said twice; 1000 AdamW steps on CPU (about two minutes). The folder (safetensors + tokenizer
that adds BOS) is committed, so the test needs no training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from allocator import data  # noqa: E402
from tests.conftest import bos_word_tokenizer, repeated_sentences  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/data/bos-llama")
    ap.add_argument("--steps", type=int, default=1000)
    args = ap.parse_args()
    tokenizer = bos_word_tokenizer()
    bos = data.bos_token_id(tokenizer)
    train = data.evaluation_sequences(tokenizer, [repeated_sentences(20000, seed=1)], 32, None, bos)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      bos_token_id=bos, eos_token_id=1, pad_token_id=0)  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(args.steps):
        batch = train[torch.randint(len(train), (16,))]
        loss = model(batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"step {step} loss {loss.item():.3f}", flush=True)
    model.eval().save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
