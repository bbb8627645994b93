"""The level database (as EvoPress builds it): every layer's compressed weight at every level, stored once.

Built in one calibration pass on dense inputs (statistics are gathered for every backend, so the
same pass can also profile) (each level of a layer sees the same Hessian), written
as one safetensors file per decoder block (keys ``"<layer>|<level>"``) plus ``manifest.json``, in a
temporary folder renamed into place when complete. Loading memory-maps the files, so setting a
layer to a level is a copy of one tensor.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from allocator.backends.all_levels import for_each_level
from allocator.errors import AllocatorError
from allocator.io import write_json_atomic
from allocator.levels import Level, parse_level, with_dense
from allocator.model import Inventory, weight_view

DB_VERSION = 1


@dataclass
class LevelDatabase:
    """A built database: where it lives, what it holds, and lazily opened memory-mapped files."""

    path: Path
    manifest: dict

    @classmethod
    def build(
        cls,
        model: nn.Module,
        inventory: Inventory,
        levels: list[Level],
        backend: str,
        path: str | Path,
        calib: torch.Tensor,
        batch_size: int = 8,
        dtype: torch.dtype | None = None,
    ) -> LevelDatabase:
        """Compress every layer at every level (``dense`` always included) and store the results."""
        levels = with_dense(levels)
        with DatabaseWriter(inventory, levels, backend, path, calib, dtype) as writer:
            for_each_level(model, inventory, levels, backend, calib, writer.visit, writer.on_block, batch_size,
                           desc="database")  # fmt: skip
        return writer.result

    @classmethod
    def open(cls, path: str | Path, inventory: Inventory | None = None) -> LevelDatabase:
        """Open a built database; with ``inventory``, refuse one built for another model."""
        path = Path(path)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except FileNotFoundError:
            raise AllocatorError(f"{path} is not a level database (no manifest.json): build it first") from None
        if manifest.get("version") != DB_VERSION:
            raise AllocatorError(
                f"{path}: database version {manifest.get('version')}, expected {DB_VERSION}: rebuild it"
            )
        if inventory is not None and manifest["fingerprint"] != inventory.fingerprint:
            raise AllocatorError(
                f"{path} was built for another model (fingerprint {manifest['fingerprint']}): rebuild it"
            )
        return cls(path, manifest)

    @property
    def levels(self) -> list[Level]:
        """The levels stored."""
        return [parse_level(name) for name in self.manifest["levels"]]

    def weight(self, layer: str, block: int, level: Level) -> torch.Tensor:
        """The stored compressed weight of ``layer`` at ``level`` ([rows, cols], memory-mapped)."""
        if level.name not in self.manifest["levels"]:
            raise AllocatorError(f"level {level.name} is not in the database (has {self.manifest['levels']})")
        with safe_open(self.path / f"block_{block:04d}.safetensors", framework="pt") as f:
            return f.get_tensor(f"{layer}|{level.name}")

    @torch.no_grad()
    def load_into_(self, model: nn.Module, inventory: Inventory, assignment: dict[str, Level]) -> None:
        """Set each assigned layer of ``model`` to its level by copying the stored weight."""
        for name, level in assignment.items():
            W = weight_view(model.get_submodule(name))
            W.copy_(self.weight(name, inventory[name].block, level))


class DatabaseWriter:
    """Receives the compressed weights of a per-level pass (:func:`for_each_level`) and writes the database.

    A context manager: blocks go to a temporary folder that is renamed into place only when the pass
    completes, so an interrupted pass leaves no half-written database. Profiles use it to build the
    database in their own calibration pass.
    """

    def __init__(self, inventory: Inventory, levels: list[Level], backend: str, path: str | Path,
                 calib: torch.Tensor, dtype: torch.dtype | None = None) -> None:  # fmt: skip
        self.path, self.dtype = Path(path), dtype
        self.manifest = {"version": DB_VERSION, "fingerprint": inventory.fingerprint, "backend": backend,
                         "levels": [lv.name for lv in levels], "calibration_tokens": int(calib.numel())}  # fmt: skip
        self.tensors: dict[str, torch.Tensor] = {}
        self.result: LevelDatabase | None = None

    def __enter__(self) -> DatabaseWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.tmp-"))
        self.start = time.perf_counter()
        return self

    def visit(self, layer, level, W, Q, _stats) -> None:
        self.tensors[f"{layer.name}|{level.name}"] = Q.to(self.dtype or W.dtype).contiguous().cpu()

    def on_block(self, layers, _stats) -> None:
        if self.tensors:
            save_file(self.tensors, self.tmp / f"block_{layers[0].block:04d}.safetensors")
        self.tensors.clear()

    def __exit__(self, exc_type, *_exc) -> None:
        try:
            if exc_type is None:
                size = sum(f.stat().st_size for f in self.tmp.glob("*.safetensors"))
                manifest = {**self.manifest, "bytes": size, "build_s": time.perf_counter() - self.start}
                write_json_atomic(self.tmp / "manifest.json", manifest)
                if self.path.exists():
                    shutil.rmtree(self.path)
                os.replace(self.tmp, self.path)
                self.result = LevelDatabase(self.path, manifest)
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
