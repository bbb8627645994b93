"""Dequantize a GGUF to F16 (F32 tensors stay F32), copying every metadata field: a source for llama-quantize.

    python scripts/gguf_to_f16.py IN.gguf OUT.gguf [NOISE]

NOISE (e.g. 0.3) adds seeded Gaussian noise of NOISE x each 2-D tensor's standard deviation: weights off every
quantization grid, for checking quantizers against llama-quantize (scripts/ggml_fixture.py).

The embedded SmolLM2 ships as Q4_1 only; re-quantizing from F16 lets every target type start from the same weights
(results/llamacpp_plans.md). Uses gguf-py's reader, dequantizers and writer only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np

KEEP = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)


def main(src: str, dst: str, noise: str = "0") -> None:
    rng = np.random.default_rng(0)

    def f16(t) -> np.ndarray:
        data = t.data if t.tensor_type in KEEP else gguf.quants.dequantize(t.data, t.tensor_type)
        dtype = np.float32 if t.tensor_type == gguf.GGMLQuantizationType.F32 else np.float16
        if float(noise) and data.ndim == 2:
            data = data.astype(np.float32)
            data = data + float(noise) * data.std() * rng.standard_normal(data.shape)
        return np.asarray(data, dtype=dtype)

    rewrite(src, dst, f16)


def rewrite(src: str, dst: str | Path, tensor: Callable) -> None:
    """``src``'s metadata (file type F16) and tensor order, each tensor's data ``tensor(reader_tensor)``."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields[gguf.Keys.General.ARCHITECTURE].contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue  # written by the writer itself
        if field.name == gguf.Keys.General.FILE_TYPE:
            writer.add_key_value(field.name, gguf.LlamaFileType.MOSTLY_F16, gguf.GGUFValueType.UINT32)
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)  # fmt: skip
    for t in reader.tensors:
        writer.add_tensor(t.name, tensor(t))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main(*sys.argv[1:4])
