"""A GGUF file rewritten with some tensors in new types, so llama.cpp runs the plan a search found.

Everything else is the source's: every metadata key (architecture, hyper-parameters, the whole tokenizer),
every other tensor's type and bytes, the tensor order and the data alignment. Quantized tensors are packed
as llama-quantize packs them (:func:`allocator.levels.ggml.ggml_quantize`, byte-exact, no importance matrix).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import gguf
import numpy as np

from allocator.errors import AllocatorError
from allocator.io import atomic_path
from allocator.levels.ggml import ggml_quantize

QUANTIZED = ("q2_K", "q3_K", "q4_K", "q5_K", "q6_K", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
TYPES = (*QUANTIZED, "f16", "bf16", "f32")
# general.file_type of a file mostly in one type (llama-quantize's name for it: Q4_K is Q4_K_M)
FILE_TYPES = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16", "Q4_0": "MOSTLY_Q4_0",
              "Q4_1": "MOSTLY_Q4_1", "Q5_0": "MOSTLY_Q5_0", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0",
              "Q2_K": "MOSTLY_Q2_K", "Q3_K": "MOSTLY_Q3_K_M", "Q4_K": "MOSTLY_Q4_K_M", "Q5_K": "MOSTLY_Q5_K_M",
              "Q6_K": "MOSTLY_Q6_K"}  # fmt: skip
FILE_TYPE = "general.file_type"


def write_gguf(source: Path, out: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> dict:
    """Write ``out``: the GGUF ``source`` with each tensor named in ``tensors`` stored as (type, float32 weight
    [rows, cols] in the HF [out_features, in_features] orientation). Atomic: on error no file is left.

    Returns {"tensors": {name: {"type", "bytes"}}, "file_type": general.file_type, "file_bytes": size of out}.
    """
    reader = _open(Path(source))
    found = {t.name: t for t in reader.tensors}
    plan = {name: _check(name, kind, W, found, Path(source).name) for name, (kind, W) in tensors.items()}
    qtypes = {name: gguf.GGMLQuantizationType[kind.upper()] for name, (kind, _) in plan.items()}
    file_type = _file_type(reader, qtypes)
    with atomic_path(out) as tmp:
        writer = gguf.GGUFWriter(tmp, reader.fields["general.architecture"].contents())
        writer.data_alignment = reader.alignment  # general.alignment, copied with the metadata, says the same
        try:
            _copy_metadata(reader, writer, file_type)
            report = _write_tensors(reader, writer, plan, qtypes)
        finally:
            writer.close()
    name = next((f.name for f in gguf.LlamaFileType if f == file_type), file_type)
    return {"tensors": report, "file_type": name, "file_bytes": Path(out).stat().st_size}


def _copy_metadata(reader, writer, file_type: int | None) -> None:
    """Every key/value of the source, in its order, with general.file_type set to ``file_type`` if any."""
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue  # the header counts, and the key GGUFWriter writes itself
        if field.name == FILE_TYPE and file_type is not None:
            writer.add_uint32(FILE_TYPE, file_type)
        else:
            writer.add_key_value(field.name, field.contents(), field.types[0], sub_type=_sub_type(field))
    if FILE_TYPE not in reader.fields and file_type is not None:
        writer.add_uint32(FILE_TYPE, file_type)


def _write_tensors(reader, writer, plan: dict, qtypes: dict) -> dict:
    """The tensors in the source's order: the planned ones packed (one in memory at a time), the rest copied."""
    for t in reader.tensors:
        if t.name in plan:
            W = plan[t.name][1]
            size, bytes_ = gguf.GGML_QUANT_SIZES[qtypes[t.name]]
            writer.add_tensor_info(t.name, W.shape, W.dtype, W.size // size * bytes_, raw_dtype=qtypes[t.name])
        else:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    report = {}
    for t in reader.tensors:
        if t.name in plan:
            kind, W = plan[t.name]
            rows = W.reshape(-1, W.shape[-1])
            data = ggml_quantize(rows, kind) if kind in QUANTIZED else gguf.quants.quantize(W, qtypes[t.name])
            writer.write_tensor_data(data)
            report[t.name] = {"type": kind, "bytes": int(data.nbytes)}
        else:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    return report


def _open(source: Path) -> gguf.GGUFReader:
    if not source.is_file():
        raise AllocatorError(f"source GGUF {str(source)!r} does not exist: pass an existing .gguf file")
    try:
        reader = gguf.GGUFReader(source)
    except (ValueError, OSError) as exc:
        raise AllocatorError(f"cannot read {str(source)!r} as GGUF ({exc}): pass a llama.cpp .gguf file") from None
    if "general.architecture" not in reader.fields:
        raise AllocatorError(f"{str(source)!r} names no general.architecture: pass a model GGUF written by llama.cpp")
    for field in reader.fields.values():
        _sub_type(field)  # refuse what cannot be copied before anything is written
    return reader


def _check(name: str, kind: str, W: np.ndarray, found: dict, source: str) -> tuple[str, np.ndarray]:
    """The canonical type name and the weight as float32, or a one-line refusal of a tensor that cannot go in."""
    canonical = {t.lower(): t for t in TYPES}.get(str(kind).lower())
    if canonical is None:
        raise AllocatorError(f"unknown GGUF type {kind!r} for {name!r}: use one of {', '.join(TYPES)}")
    if name not in found:
        raise AllocatorError(f"{source} has no tensor {name!r}: use one of its names, e.g. {next(iter(found))!r}")
    W = np.ascontiguousarray(W, dtype=np.float32)
    shape = tuple(int(n) for n in reversed(found[name].shape))  # GGUF lists ne[0] (the row length) first
    if W.shape != shape:
        raise AllocatorError(
            f"{name!r} is {list(shape)} in {source}, got {list(W.shape)}: pass it as [out_features, in_features]"
        )
    if canonical in QUANTIZED:
        size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[canonical.upper()]][0]
        if W.shape[-1] % size:
            raise AllocatorError(
                f"{canonical} packs blocks of {size} weights, {name!r} has rows of {W.shape[-1]}: "
                f"pick a type whose block divides {W.shape[-1]} (q8_0, q4_0 .. q5_1 take multiples of 32)"
            )
    return canonical, W


def _sub_type(field: gguf.ReaderField) -> gguf.GGUFValueType | None:
    if field.types[0] != gguf.GGUFValueType.ARRAY:
        return None
    if len(field.types) != 2:  # an empty array has no element type; gguf-py flattens nested ones
        raise AllocatorError(
            f"metadata key {field.name!r} is an empty or nested array, which gguf-py cannot copy: "
            "remove the key from the source"
        )
    return field.types[1]


def _file_type(reader, qtypes: dict) -> int | None:
    """The source's general.file_type while its matrices stay mostly in the same type, else the one of the
    type that now holds the most weights (None where gguf-py names no such file type)."""

    def dominant(types: dict) -> str:
        counts = Counter()
        for t in reader.tensors:
            if len(t.shape) >= 2:
                counts[types.get(t.name, t.tensor_type).name] += t.n_elements
        return counts.most_common(1)[0][0] if counts else "F32"

    before, after = dominant({}), dominant(qtypes)
    kept = reader.fields.get(FILE_TYPE)
    if kept is not None and before == after:
        return int(kept.contents())
    return int(gguf.LlamaFileType[FILE_TYPES[after]]) if after in FILE_TYPES else None
