"""The level database (as EvoPress builds it): every layer's compressed weight at every level.

Built in one calibration pass on dense inputs (the profile's pass can build it too), stored compactly
(:mod:`allocator.backends.codec`: nested pruning as one order per weight, quantized levels as codes
into per-group tables, other sparse levels as mask + kept values) as one safetensors file per decoder
block plus a versioned ``manifest.json``, written in a temporary folder renamed into place when complete. The dense
weights are not stored: the model holds them (a run keeps a host copy), so a database decodes against the model's
own, checked against the digest it recorded of each layer (an 8B model's database is 15 GB smaller for it).

For a search, :meth:`LevelDatabase.resident` moves the whole database to the GPU when it fits beside the
model, so setting a layer to a level is a device-side decode into its weight; otherwise the parts stay in
(pinned) host memory and the most recently decoded (layer, level) weights are kept on the device.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from allocator.backends.activations import needs_state, set_activations_
from allocator.backends.all_levels import for_each_level
from allocator.backends.codec import Parts, decode, grid_of
from allocator.backends.db_files import DB_VERSION, DTYPES, THREADS, damage, dense_weights, digest
from allocator.backends.db_writer import DatabaseWriter
from allocator.errors import AllocatorError
from allocator.inventory import Inventory, weight_view
from allocator.levels import Level, parse_level, with_dense


@dataclass
class LevelDatabase:
    """A built database: where it lives, what it holds, and (once loaded) its parts per layer."""

    path: Path
    manifest: dict
    dense: Mapping[str, torch.Tensor] | None = None  # layer -> the model's dense [rows, cols] weight (not stored)
    parts: dict[str, Parts] = field(default_factory=dict)  # layer -> its tensors, once loaded
    cache_bytes: int = 0  # decoded weights kept on the device when the parts are not there
    _decoded: OrderedDict = field(default_factory=OrderedDict)
    _device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _checked: dict[str, torch.Tensor] = field(default_factory=dict)  # dense weights whose digest matched
    _resident: bool = False  # every part loaded by :meth:`resident` for ``_device``

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
        dense: Mapping[str, torch.Tensor] | None = None,
    ) -> LevelDatabase:
        """Compress every layer at every level (``dense`` always included) and store the results; ``dense``: the
        model's dense weights the result decodes against (default: host copies of ``model``'s, taken first)."""
        levels = with_dense(levels)
        dense = dense if dense is not None else dense_weights(model, inventory)
        with DatabaseWriter(inventory, levels, backend, path, calib, dtype) as writer:
            for_each_level(model, inventory, levels, backend, calib, writer.visit, writer.on_block, batch_size,
                           desc="database")  # fmt: skip
        return cls(Path(path), writer.written, dense)

    @classmethod
    def open(cls, path: str | Path, inventory: Inventory | None = None,
             dense: Mapping[str, torch.Tensor] | None = None) -> LevelDatabase:  # fmt: skip
        """Open a built database; with ``inventory``, refuse one built for another model. A damaged one (manifest or
        block files) is refused in one line, before any search reads it. ``dense``: the model's dense weights, which
        decoding needs (each layer's is checked against the digest recorded at build when first used)."""
        path = Path(path)
        try:
            manifest = json.loads((path / "manifest.json").read_text())
        except FileNotFoundError:
            raise AllocatorError(f"{path} is not a level database (no manifest.json): build it first") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AllocatorError(f"{path}/manifest.json is corrupt ({exc}): delete the folder and rebuild") from None
        if isinstance(manifest, dict) and manifest.get("version") != DB_VERSION:
            raise AllocatorError(
                f"{path}: database version {manifest.get('version')}, expected {DB_VERSION}: rebuild it"
            )
        if (why := damage(path, manifest)) is not None:
            raise AllocatorError(f"level database {path} is damaged ({why}): delete the folder and rebuild")
        if inventory is not None and manifest["fingerprint"] != inventory.fingerprint:
            raise AllocatorError(
                f"{path} was built for another model (fingerprint {manifest['fingerprint']}): rebuild it"
            )
        shapes = inventory.shapes if inventory is not None else {}
        if inventory is not None and (bad := [n for n, e in manifest["layers"].items() if shapes.get(n) != e["shape"]]):
            raise AllocatorError(f"level database {path} is damaged (layer {bad[0]}: not the model's shape): "
                                 "delete the folder and rebuild")  # fmt: skip
        db = cls(path, manifest, dense)
        if dense is not None:  # every digest now: a database of other weights is refused before any search reads it
            db._all_dense()
        return db

    @property
    def levels(self) -> list[Level]:
        """The levels stored."""
        return [parse_level(name) for name in self.manifest["levels"]]

    # ---- where the parts live ------------------------------------------------------------------
    def resident(
        self, device: torch.device | str, max_bytes: int | None = None, cache_bytes: int | None = None
    ) -> LevelDatabase:
        """Load every part onto ``device`` if the database fits in ``max_bytes`` (default: half of a GPU's
        free memory), else into host memory (pinned for a GPU). Up to ``cache_bytes`` of the most recently
        decoded weights stay on ``device`` (default: 1 GiB when the parts are on the host, else none)."""
        device = torch.device(device)
        if self._resident and self._device == device and max_bytes is None and cache_bytes is None:
            return self  # already loaded for it: an 8B model's parts take a minute to read and pin again
        if max_bytes is None and device.type == "cuda":
            max_bytes = torch.cuda.mem_get_info(device)[0] // 2
        dense_bytes = sum(math.prod(info["shape"]) * self._element(n) for n, info in self.manifest["layers"].items())
        on_device = max_bytes is None or self.manifest["bytes"] + dense_bytes <= max_bytes
        home = device if on_device else torch.device("cpu")
        pin = home.type == "cpu" and device.type == "cuda"
        self.parts = {layer: {"dense": W} for layer, W in self._all_dense().items()}
        for block in sorted({entry["block"] for entry in self.manifest["layers"].values()}):
            with safe_open(self._file(block), framework="pt") as f:
                for key in f.keys():
                    layer, part = key.split("|", 1)
                    if layer not in self.parts:
                        why = f"{self._file(block).name} holds {layer}, which its manifest lacks"
                        raise AllocatorError(f"level database {self.path} is damaged ({why}): delete it and rebuild")
                    self.parts[layer][part] = f.get_tensor(key)
        for layer_parts in self.parts.values():
            for part, tensor in layer_parts.items():
                layer_parts[part] = (tensor.pin_memory() if pin else tensor).to(home)
        if cache_bytes is None:
            cache_bytes = 0 if on_device else 2**30
        self._device, self.cache_bytes, self._resident = device, cache_bytes, True
        self._decoded.clear()
        return self

    def _file(self, block: int) -> Path:
        return self.path / f"block_{block:04d}.safetensors"

    def _layer_parts(self, layer: str) -> Parts:
        if layer in self.parts:
            return self.parts[layer]
        with safe_open(self._file(self.manifest["layers"][layer]["block"]), framework="pt") as f:
            parts = {key.split("|", 1)[1]: f.get_tensor(key) for key in f.keys() if key.split("|", 1)[0] == layer}
        return {"dense": self._dense(layer), **parts}

    def _element(self, layer: str) -> int:
        return DTYPES[self.manifest["layers"][layer]["dense"].split(":")[0]].itemsize

    def _all_dense(self) -> dict[str, torch.Tensor]:
        """Every layer's dense weight, the digests checked in parallel (hashlib frees the GIL)."""
        layers = list(self.manifest["layers"])
        with ThreadPoolExecutor(THREADS) as pool:
            return dict(zip(layers, pool.map(self._dense, layers), strict=True))

    def _dense(self, layer: str) -> torch.Tensor:
        """The model's dense weight of ``layer`` in the stored dtype, once its digest matched the recorded one."""
        if layer in self._checked:
            return self._checked[layer]
        if self.dense is None or layer not in self.dense:
            raise AllocatorError(f"level database {self.path}: decoding {layer} needs the model's dense weights "
                                 "(a database does not store them): open it with the model's")  # fmt: skip
        recorded = self.manifest["layers"][layer]["dense"]
        W = self.dense[layer].to(DTYPES[recorded.split(":")[0]])
        if digest(W) != recorded:
            raise AllocatorError(f"level database {self.path} was built from other weights of {layer} than the "
                                 "model's: delete the folder and rebuild")  # fmt: skip
        self._checked[layer] = W
        return W

    # ---- decoding ------------------------------------------------------------------------------
    def weight(self, layer: str, level: Level) -> torch.Tensor:
        """The stored compressed weight of ``layer`` at ``level`` ([rows, cols], decoded on the parts' device)."""
        if level.name not in self.manifest["levels"]:
            raise AllocatorError(f"level {level.name} is not in the database (has {self.manifest['levels']})")
        info = self.manifest["layers"][layer]
        if level.name not in info["levels"]:
            raise AllocatorError(f"level {level.name} does not apply to {layer} (shape {info['shape']})")
        key = (layer, level.name)
        if key in self._decoded:
            self._decoded.move_to_end(key)
            return self._decoded[key]
        parts = self._layer_parts(layer)
        if not self.cache_bytes:
            return decode(info["levels"][level.name], level, parts, tuple(info["shape"]))
        # decode on the device (from host parts if they live there) and keep the result (LRU)
        parts = {k: v.to(self._device, non_blocking=True) for k, v in parts.items()}
        W = decode(info["levels"][level.name], level, parts, tuple(info["shape"]))
        self._decoded[key] = W
        while (
            len(self._decoded) > 1
            and sum(t.numel() * t.element_size() for t in self._decoded.values()) > self.cache_bytes
        ):
            self._decoded.popitem(last=False)
        return W

    def grid(self, layer: str, level: Level) -> tuple[torch.Tensor, tuple] | None:
        """The stored codes and grid parameters of ``layer`` at ``level`` (None if it is not stored so)."""
        info = self.manifest["layers"][layer]
        entry = info["levels"].get(level.name, {})
        if entry.get("enc") != "grid":
            return None
        return grid_of(entry, level, self._layer_parts(layer), tuple(info["shape"]))

    @property
    def input_absmax(self) -> dict[str, torch.Tensor]:
        """Per layer, the largest |x| its dense input reached on the calibration windows (calibrated activations)."""
        return {n: torch.tensor(info["input_absmax"]) for n, info in self.manifest["layers"].items()}

    @torch.no_grad()
    def load_into_(self, model: nn.Module, assignment: dict[str, Level]) -> None:
        """Set each assigned layer of ``model`` to its level: a decode into its weight buffer, and its input
        quantization where the level quantizes activations."""
        for name, level in assignment.items():
            weight_view(model.get_submodule(name)).copy_(self.weight(name, level))
        set_activations_(model, assignment, self.input_absmax if needs_state(list(assignment.values())) else {})
