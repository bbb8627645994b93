"""Sensitivity profiles: the error of every layer at every level, from calibration data, as a tidy table.

error = ||W X - Ŵ X||² / ||W X||² = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) with H = 2/n XᵀX the layer's input
Gram matrix on dense inputs (one calibration pass for all levels). fisher = the same output error
weighted by the Fisher of the model's predictions (:mod:`allocator.sensitivity.fisher`): a predicted KL
in nats, comparable across layers. The same pass records OWL's layer-wise outlier ratio (the share of
Wanda scores |W_ij|·||X_j|| above M times their block mean). ``kl`` (measured end to end) is added by
:meth:`Profile.add_kl`; ``fitted`` depends on the budget, so it lives in the run folder, not here.

Stored as Parquet under ``profiles/<model>/`` with the metadata (model fingerprint, grid, backend,
data, seed, tokens) in the file's schema, and reused when a later run asks for the same thing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm.auto import tqdm

from allocator.backends.all_levels import for_each_level
from allocator.backends.calibrate import blockwise
from allocator.errors import AllocatorError
from allocator.formats import storage_bits
from allocator.inventory import Inventory, weight_view
from allocator.io import atomic_path
from allocator.levels import Level, with_dense
from allocator.sensitivity import SENSITIVITIES
from allocator.sensitivity.fisher import fisher_error, output_fisher, row_energy

PROFILE_VERSION = 4  # 2: the fisher column; 3: column norms from their own sums, activation noise; 4: labels
FISHER_SEQS = 32  # calibration windows the Fisher pass uses (its estimate settles well before 128)
OWL_M = 5.0  # OWL's outlier threshold: scores above M x the block mean (paper default)
COLUMNS = ("layer", "block", "role", "level", "params", "kept_params", "bits", "error", "fisher", "outlier_ratio")


@dataclass
class Profile:
    """A layer x level error table plus the metadata that says what it was measured on."""

    table: pd.DataFrame  # COLUMNS (and kl where measured)
    meta: dict

    @classmethod
    def measure(
        cls,
        model: nn.Module,
        inventory: Inventory,
        levels: list[Level],
        backend: str,
        calib: torch.Tensor,
        meta: dict | None = None,
        batch_size: int = 8,
        also: Sequence = (),
    ) -> Profile:
        """Compress each layer at each level on dense inputs and record its relative and Fisher-weighted errors.

        ``also``: more receivers of the same pass (``visit``/``on_block`` methods, e.g. a
        :class:`allocator.backends.db_writer.DatabaseWriter`), so the database costs no second pass.
        """
        levels = with_dense(levels)
        seed = int((meta or {}).get("seed", 0))
        fisher = output_fisher(model, inventory, calib[:FISHER_SEQS], batch_size, seed)
        rows: list[dict] = []
        outliers: dict[int, float] = {}
        base_energy: dict[str, float] = {}  # tr(W H Wᵀ) per layer, shared by its levels

        def visit(layer, level, W, Q, stats, params) -> None:
            # float32 products (float64 would triple the profile's time on CPU), float64 sums
            D, H = (W - Q).float(), stats.H
            base = base_energy.get(layer.name)
            if base is None:
                base = base_energy[layer.name] = float(((W.float() @ H) * W.float()).double().sum())
            f = fisher[layer.name]
            extra = activation_error(level, W, Q, stats)  # [rows]: what the level's input quantization adds
            energy = row_energy(D, H)
            error = (float(energy.sum()) + 2 * float(extra.double().sum())) / max(base, 1e-30)
            fisher_kl = fisher_error(energy, f) + 0.5 * float((f.to(extra.device) * extra).double().sum())
            rows.append({"layer": layer.name, "block": layer.block, "role": layer.role, "level": level.name,
                         "params": layer.params, "kept_params": level.kept_params(layer.rows, layer.cols),
                         "bits": storage_bits(level, layer.rows, layer.cols), "error": error,
                         "fisher": fisher_kl})  # fmt: skip
            for receiver in also:
                receiver.visit(layer, level, W, Q, stats, params)

        def on_block(layers, stats) -> None:
            outliers[layers[0].block] = block_outlier_ratio(model, layers, stats)
            for receiver in also:
                receiver.on_block(layers, stats)

        for_each_level(model, inventory, levels, backend, calib, visit, on_block, batch_size, desc="profile")
        table = pd.DataFrame(rows)
        table["outlier_ratio"] = table["block"].map(outliers)
        meta = {
            "version": PROFILE_VERSION,
            "fingerprint": inventory.fingerprint,
            "grid": [lv.name for lv in levels],
            "backend": backend,
            "calibration_tokens": int(calib.numel()),
            "owl_m": OWL_M,
            "fisher_tokens": int(calib[:FISHER_SEQS].numel()),
            **(meta or {}),
        }
        return cls(table, meta)

    def add_kl(self, fitness, problem, rows: np.ndarray) -> None:
        """Add column ``kl``: KL to the dense model when only that layer is compressed to that level.

        ``fitness`` is a :class:`allocator.fitness.KLFitness` over a per-layer ``problem`` whose grid
        holds ``dense``; each entry runs the model from the layer's own block on pool ``rows``.
        """
        names = [lv.name for lv in problem.levels]
        if "dense" not in names or any(len(unit) != 1 for unit in problem.units):
            raise AllocatorError("end-to-end KL profiles need a per-layer problem whose grid includes 'dense'")
        dense = np.full(len(problem.units), names.index("dense"))
        fitness.set_parent(dense)
        kl = {}
        for u, (name,) in enumerate(tqdm(problem.units, desc="KL profile", leave=False)):
            for k, level in enumerate(problem.levels):
                if np.isfinite(problem.cost[u, k]):
                    choice = dense.copy()
                    choice[u] = k
                    kl[name, level.name] = 0.0 if k == dense[0] else fitness(choice, rows)
        self.table["kl"] = [
            kl.get((n, lv), np.nan) for n, lv in zip(self.table["layer"], self.table["level"], strict=True)
        ]
        self.meta["kl_tokens"] = int(len(rows) * fitness.seq_len)

    # ---- storage ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """Write Parquet atomically, metadata in the schema."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pandas(self.table, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"allocator": json.dumps(self.meta)})
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a profile written by :meth:`save` (no pickle: Parquet + JSON metadata), refusing in one line one
        that is truncated, not Parquet, or whose metadata or columns are not a profile's."""
        try:
            table = pq.read_table(path)
        except FileNotFoundError:
            raise AllocatorError(f"profile {str(path)!r} does not exist: run `allocator profile` first") from None
        except (pa.ArrowException, OSError) as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise AllocatorError(f"profile {str(path)!r} is not a Parquet file ({why}): re-create it") from None
        raw = (table.schema.metadata or {}).get(b"allocator")
        if raw is None:
            raise AllocatorError(f"{path} is not an allocator profile (no metadata): re-create it")
        try:
            meta = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise AllocatorError(f"{path}: its metadata is not JSON: re-create the profile") from None
        if not isinstance(meta, dict):
            raise AllocatorError(f"{path}: its metadata is a JSON {type(meta).__name__}, not an object: re-create it")
        if meta.get("version") != PROFILE_VERSION:
            raise AllocatorError(f"{path}: profile version {meta.get('version')}, not {PROFILE_VERSION}: re-create it")
        grid = meta.get("grid")
        bad = [f"metadata {k!r}" for k in ("fingerprint", "backend") if not isinstance(meta.get(k), str)]
        if not isinstance(grid, list) or not all(isinstance(g, str) for g in grid):
            bad.append("metadata 'grid'")
        bad += [f"column {c!r}" for c in COLUMNS if c not in table.column_names]
        if bad:
            raise AllocatorError(f"{path}: {', '.join(bad)} missing or malformed: re-create the profile")
        return cls(table.to_pandas(), meta)

    def check(self, inventory: Inventory, levels: list[Level], backend: str) -> None:
        """Refuse a profile made for another model, another grid or another backend."""
        if self.meta["fingerprint"] != inventory.fingerprint:
            raise AllocatorError(
                f"profile was measured on another model (fingerprint {self.meta['fingerprint']}, this model "
                f"{inventory.fingerprint}): profile this model"
            )
        missing = sorted({lv.name for lv in levels} - set(self.meta["grid"]))
        if missing:
            raise AllocatorError(f"profile lacks levels {missing} of the grid (it has {self.meta['grid']}): re-profile")
        if self.meta["backend"] != backend:
            raise AllocatorError(f"profile was measured with backend {self.meta['backend']!r}, not {backend!r}")

    # ---- views for searchers ----------------------------------------------------------------
    def summary(self) -> pd.DataFrame:
        """Per level: mean, min and max relative error over layers (and mean KL where measured)."""
        out = self.table.groupby("level", sort=False)["error"].agg(["mean", "min", "max"])
        if "kl" in self.table:
            out["kl"] = self.table.groupby("level", sort=False)["kl"].mean()
        return out

    def error_matrix(self, units: list[tuple[str, ...]], levels: list[Level], column: str = "error") -> np.ndarray:
        """Summed ``column`` (a sensitivity) of each unit at each level ([U, K]); +inf where not measured."""
        if column not in self.table:
            known = [c for c in SENSITIVITIES if c in self.table]
            raise AllocatorError(f"profile has no {column!r} sensitivity (it has {known}): re-profile with it")
        pivot = self.table.pivot(index="layer", columns="level", values=column)
        names = [lv.name for lv in levels]
        pivot = pivot.reindex(columns=names)
        out = np.zeros((len(units), len(levels)))
        for u, unit in enumerate(units):
            out[u] = pivot.loc[list(unit)].to_numpy(dtype=float).sum(axis=0)
        return np.where(np.isnan(out), np.inf, out)

    def outlier_ratio(self, units: list[tuple[str, ...]]) -> np.ndarray:
        """OWL's block outlier ratio for each unit ([U])."""
        per_layer = self.table.drop_duplicates("layer").set_index("layer")["outlier_ratio"]
        return np.array([per_layer[unit[0]] for unit in units], dtype=float)


def activation_error(level: Level, W: torch.Tensor, Q: torch.Tensor, stats) -> torch.Tensor:
    """Per output row, the mean squared output error a level's activation quantization adds to its weight error,
    ``E[(w·x − q·a(x))²] − E[((w − q)·x)²]``, on the first input rows calibration kept ([rows]; zeros without)."""
    if level.acts is None:
        return torch.zeros(W.shape[0], device=W.device)
    X = stats.sample  # [n, cols] float32
    Xq = level.acts.fake_quant(X.to(W.dtype), stats.absmax).float()
    with_acts = X @ W.float().t() - Xq @ Q.float().t()  # [n, rows]
    weights_only = X @ (W - Q).float().t()
    return (with_acts.square() - weights_only.square()).mean(0)


def block_outlier_ratio(model: nn.Module, layers: list, stats: dict) -> float:
    """OWL's layer-wise outlier ratio of one block: the share of the Wanda scores |W_ij|·||X_j|| of all its
    linears, pooled, above M times their mean."""
    flat = torch.cat([(weight_view(model.get_submodule(x.name)).abs() * stats[x.name].col_norms).flatten()
                      for x in layers])  # fmt: skip
    return float((flat > OWL_M * flat.mean()).float().mean())


@torch.no_grad()
def input_stats(model: nn.Module, inventory: Inventory, calib: torch.Tensor, batch_size: int = 8) -> dict:
    """Per layer, its dense-input column norms and largest |x| from one pass that compresses nothing and builds
    no Hessian: what OWL's outlier ratios, Wanda and calibrated activation scales read."""
    out = {}
    blockwise(model, inventory, calib, lambda _layers, stats: out.update(stats), sequential=False,
              batch_size=batch_size, desc="input statistics", hessian=False)  # fmt: skip
    return out


def outlier_ratios(model: nn.Module, inventory: Inventory, stats: dict) -> dict[str, float]:
    """Per layer, its block's OWL outlier ratio from the layers' input statistics."""
    by_block: dict[int, list] = {}
    for layer in inventory.layers:
        by_block.setdefault(layer.block, []).append(layer)
    return {x.name: ratio for layers in by_block.values()
            for ratio in [block_outlier_ratio(model, layers, stats)] for x in layers}  # fmt: skip
