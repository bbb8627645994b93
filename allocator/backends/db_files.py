"""What a level database's files must be, checked before any search reads them, and what they will take.

A manifest from a shared cache is untrusted input: :func:`damage` says what makes one unusable, in one line. Each
layer's entry records the :func:`digest` of the dense weight it was built from (the database decodes against the
model's own: see :mod:`allocator.backends.database`); :func:`estimate_bytes` sizes a database before its build.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from allocator.formats import unfit
from allocator.inventory import Inventory, weight_view
from allocator.levels import Level
from allocator.levels.base import WeightFormat

DB_VERSION = 4  # 1: a full copy per (layer, level); 2: codebooks for quantized levels, no input scales; 3: dense stored
ENTRY = {"block": int, "shape": list, "levels": dict, "input_absmax": float, "dense": str}  # a layer's manifest entry
DTYPES = {str(t).removeprefix("torch."): t for t in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
DIGEST = re.compile(rf"^({'|'.join(DTYPES)}):[0-9a-f]{{32}}$")
THREADS = min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _is_entry(entry: object) -> bool:
    typed = isinstance(entry, dict) and all(isinstance(entry.get(k), kind) for k, kind in ENTRY.items())
    shape = typed and entry["shape"]
    return (typed and not isinstance(entry["block"], bool) and DIGEST.match(entry["dense"]) is not None
            and len(shape) == 2 and all(type(n) is int and n > 0 for n in shape))  # fmt: skip


def damage(path: Path, manifest: object) -> str | None:
    """What makes a database unusable, or None: a manifest that is not a database's, or a block file missing, of
    another size than its manifest records, or (a manifest from before sizes were recorded) one that does not open."""
    if not isinstance(manifest, dict):
        return f"manifest.json is a JSON {type(manifest).__name__}, not an object"
    levels, layers, files = manifest.get("levels"), manifest.get("layers"), manifest.get("files", {})
    typed = (isinstance(manifest.get("fingerprint"), str) and isinstance(manifest.get("bytes"), int)
             and isinstance(levels, list) and all(isinstance(n, str) for n in levels) and isinstance(files, dict)
             and isinstance(layers, dict) and all(map(_is_entry, layers.values())))  # fmt: skip
    if not typed:
        return "manifest.json lacks or mistypes a field"
    for block in sorted({e["block"] for e in layers.values()}):
        name = f"block_{block:04d}.safetensors"
        if not (path / name).is_file():
            return f"{name} is missing"
        size = (path / name).stat().st_size
        if "files" in manifest and size != files.get(name):
            return f"{name} has {size} bytes, the manifest says {files.get(name)}"
        try:
            with safe_open(path / name, framework="pt"):  # reads the header: a truncated file does not open
                pass
        except (SafetensorError, OSError) as exc:
            return f"{name} does not open: {(str(exc).splitlines() or [type(exc).__name__])[0]}"
    return None


def dense_weights(model: nn.Module, inventory: Inventory) -> dict[str, torch.Tensor]:
    """Host copies of the layers' dense ``[rows, cols]`` weights: what a database of ``model`` decodes against."""
    return {lay.name: weight_view(model.get_submodule(lay.name)).detach().to("cpu", copy=True).contiguous()
            for lay in inventory.layers}  # fmt: skip


def digest(W: torch.Tensor) -> str:
    """``<dtype>:<hash of the bytes>`` of a weight: a database is decoded only against the weights it was built from."""
    raw = W.detach().contiguous().cpu().flatten().view(torch.uint8).numpy()
    return f"{str(W.dtype).removeprefix('torch.')}:{hashlib.blake2b(raw.data, digest_size=16).hexdigest()}"


def estimate_bytes(inventory: Inventory, levels: list[Level], nested: bool, dtype: torch.dtype) -> int:
    """About how many bytes the database of ``levels`` takes in ``dtype`` (before it is built, to check the disk): no
    dense weights (the model holds them); nested pruning (magnitude, Wanda) one byte per weight for the whole chain;
    other sparse levels a bit mask, and where the kept values move (not nested) about a byte per bfloat16 value (steps
    from the dense one) or the value itself; quantized levels with codes their codes and grid parameters, others (GGUF
    types: a codebook, used only where smaller) a mask and every value; a drop nothing. On the high side, measured
    against built databases in the tests."""
    element_size, total = dtype.itemsize, 0
    for layer in inventory.layers:
        n = layer.rows * layer.cols
        fits = [lv for lv in levels if unfit(lv, layer.rows, layer.cols) is None and not lv.is_dense and not lv.drop]
        chain = [lv for lv in fits if lv.weights is None and lv.prune is not None and lv.prune.nm is None]
        total += n if nested and chain else 0
        for level in fits:
            if level.weights is not None and type(level.weights).codes is not WeightFormat.codes:
                groups = layer.rows * -(-layer.cols // level.weights.code_group(layer.cols))
                total += n * level.weights.value_bits // 8 + 8 * groups + (n // 8 if level.prune else 0)
            elif level.weights is not None:  # a codebook, or where it is not smaller a mask and the values
                total += n // 8 + n * element_size
            elif not (nested and level in chain):  # a mask; kept values moved (not nested): bf16 steps, or as is
                moved = 0 if nested else level.kept_params(layer.rows, layer.cols)
                total += n // 8 + moved * (1 if dtype == torch.bfloat16 else element_size)
    return int(total * 1.1) + 1024 * len(inventory.layers) * len(levels)  # + the files' headers (< 1 KB a part)
