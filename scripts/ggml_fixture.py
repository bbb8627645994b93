"""Rows quantized by a real llama-quantize, for tests/test_ggml.py (our GGUF rounding against llama.cpp's own).

    python scripts/ggml_fixture.py SRC-F16.gguf /path/to/llama-quantize tests/data/ggml_rows.safetensors

SRC is an F16 GGUF whose weights lie on no grid (scripts/gguf_to_f16.py with NOISE). Each type is written with
``llama-quantize --pure``; the first rows of a 576-wide tensor (legacy types) and of a 1536-wide one (k-quants,
whose 256-blocks need it) are kept as F16 source rows plus llama.cpp's raw blocks (a few KB per type).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import save_file

TYPES = ("q8_0", "q6_K", "q5_K", "q5_1", "q5_0", "q4_K", "q4_1", "q4_0", "q3_K", "q2_K")
TENSORS = {"narrow": "blk.3.attn_q.weight", "wide": "blk.3.ffn_down.weight"}  # 576 and 1536 weights per row
ROWS = 8


def main(src: str, quantize: str, out: str) -> None:
    source = {t.name: t for t in gguf.GGUFReader(src).tensors}
    tensors = {f"source.{k}": np.asarray(source[v].data[:ROWS], dtype=np.float16) for k, v in TENSORS.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in TYPES:
            path = Path(tmp) / f"{kind}.gguf"
            subprocess.run([quantize, "--pure", src, str(path), kind.upper()], check=True, capture_output=True)
            found = {t.name: t for t in gguf.GGUFReader(path).tensors}
            for key, name in TENSORS.items():
                t = found[name]
                if t.tensor_type.name.lower() == kind.lower():  # 576-wide rows of a k-quant fall back: not kept
                    tensors[f"{kind}.{key}"] = np.ascontiguousarray(t.data[:ROWS])
    save_file(tensors, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
