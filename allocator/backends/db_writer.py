"""Writes a level database from a per-level pass: one safetensors file per decoder block, then the manifest.

The pass (:func:`allocator.backends.all_levels.for_each_level`, or a profile's own) hands each block's compressed
weights to :class:`DatabaseWriter`; :class:`allocator.backends.database.LevelDatabase` reads what it wrote.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from allocator.backends.codec import encode_layer
from allocator.backends.db_files import DB_VERSION, THREADS, digest
from allocator.inventory import Inventory
from allocator.io import atomic_path, write_json_atomic
from allocator.levels import Level


class DatabaseWriter:
    """Receives the compressed weights of a per-level pass (:func:`for_each_level`) and writes the database.

    A context manager: blocks go to a temporary folder that is renamed into place only when the pass
    completes, so an interrupted pass leaves no half-written database. Profiles use it to build the
    database in their own calibration pass. A block's file is written by a thread while the next block is
    compressed (an 8B model writes 37.5 GB); its error, a full disk, surfaces at the next block or the end.
    """

    def __init__(self, inventory: Inventory, levels: list[Level], backend: str, path: str | Path,
                 calib: torch.Tensor, dtype: torch.dtype | None = None) -> None:  # fmt: skip
        self.path, self.dtype = Path(path), dtype
        self.manifest = {"version": DB_VERSION, "fingerprint": inventory.fingerprint, "backend": backend,
                         "levels": [lv.name for lv in levels], "calibration_tokens": int(calib.numel()),
                         "layers": {}, "full_copy_bytes": 0}  # fmt: skip
        self.compressed: dict[str, dict[Level, torch.Tensor]] = {}  # this block's layers, level -> weight
        self.params: dict[str, dict[Level, tuple]] = {}  # and their grid parameters
        self.dense: dict[str, torch.Tensor] = {}
        self.written: dict | None = None  # the manifest, once the database is in place

    def __enter__(self) -> DatabaseWriter:
        self._atomic = atomic_path(self.path, folder=True)  # a killed build's folder is removed by the next
        self.tmp = self._atomic.__enter__()
        self.start = time.perf_counter()
        self._io, self._pending = ThreadPoolExecutor(1), None
        return self

    def _drain(self) -> None:
        """Wait for the block file being written; its error is raised here."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def visit(self, layer, level, W, Q, _stats, params) -> None:
        dtype = self.dtype or W.dtype
        self.dense.setdefault(layer.name, W.to(dtype, copy=True))
        self.compressed.setdefault(layer.name, {})[level] = Q.to(dtype)
        if params and dtype == Q.dtype:  # codes and scales, stored as a checkpoint stores them
            self.params.setdefault(layer.name, {})[level] = params

    def on_block(self, layers, stats) -> None:
        """Encode the block's layers (on the device they were compressed on) and write its file."""
        tensors, dense = {}, {}
        for layer in layers:
            if layer.name not in self.compressed:
                continue
            levels = self.compressed.pop(layer.name)
            parts, entries = encode_layer(self.dense.pop(layer.name), levels, self.params.pop(layer.name, {}))
            dense[layer.name] = parts.pop("dense")  # the model holds it: only its digest is kept
            tensors.update({f"{layer.name}|{k}": v.contiguous().cpu() for k, v in parts.items()})
            self.manifest["layers"][layer.name] = {"block": layer.block, "shape": [layer.rows, layer.cols],
                                                   "levels": entries,
                                                   "input_absmax": float(stats[layer.name].absmax)}  # fmt: skip
            self.manifest["full_copy_bytes"] += sum(Q.numel() * Q.element_size() for Q in levels.values())
        with ThreadPoolExecutor(THREADS) as pool:
            for name, found in zip(dense, pool.map(digest, dense.values()), strict=True):
                self.manifest["layers"][name]["dense"] = found
        self._drain()
        if any(layer.name in self.manifest["layers"] for layer in layers):  # a file per block, empty or not
            self._pending = self._io.submit(save_file, tensors, self.tmp / f"block_{layers[0].block:04d}.safetensors")

    def __exit__(self, exc_type, exc, tb) -> None:
        failed = None
        try:
            self._drain()
        except Exception as error:  # the last block's write: handled as an error of the pass
            failed = error
            if exc_type is None:
                exc_type, exc, tb = type(error), error, error.__traceback__
        finally:
            self._io.shutdown()
        manifest = None
        if exc_type is None:
            files = {f.name: f.stat().st_size for f in sorted(self.tmp.glob("*.safetensors"))}  # checked on open
            manifest = {**self.manifest, "files": files, "bytes": sum(files.values()),
                        "build_s": time.perf_counter() - self.start}  # fmt: skip
            write_json_atomic(self.tmp / "manifest.json", manifest)
        self._atomic.__exit__(exc_type, exc, tb)  # moved into place only without an error (a write's: one line)
        if failed is not None and exc is failed:
            raise failed  # not a write error: the with statement would not see it
        self.written = manifest
