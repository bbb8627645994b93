"""The one owner of cached measurements: sensitivity profiles, level databases and dense references.

Everything lives under one root (``--cache-dir``, else ``$ALLOCATOR_CACHE`` or ``~/.cache/allocator``), named by one
rule: ``<root>/<kind>/<model>/<backend>-<hash of grid, data and rounding>``, so a run on the same model and data
reuses what an earlier run measured, and another model, grid, backend or text is a miss, never a stale hit. Every
entry is written beside its final name and moved into place when complete; the temporaries a killed process left
anywhere under the root are removed when a workspace is opened (one cleanup rule). Converted models live here
too (``models/``, :func:`allocator.model.load_model`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from allocator.backends import get_backend
from allocator.backends.database import LevelDatabase
from allocator.backends.db_files import dense_weights, estimate_bytes
from allocator.backends.db_writer import DatabaseWriter
from allocator.budget import Budget, build_problem
from allocator.errors import AllocatorError
from allocator.fitness import KLFitness
from allocator.inventory import Inventory
from allocator.io import check_space, remove_orphans
from allocator.levels import Level, with_dense
from allocator.model import cache_dir
from allocator.profile import Profile
from allocator.reference import DenseReference, dense_reference

log = logging.getLogger(__name__)
KINDS = ("profiles", "db", "dense", "models")


@dataclass(frozen=True)
class Calibration:
    """What a measurement runs on: the model (dense weights), its layers, the calibration windows and what they are."""

    model: nn.Module
    inventory: Inventory
    model_id: str
    seqs: torch.Tensor  # [n, seq_len] token ids
    meta: dict  # the windows' source, count, length, seed, BOS: part of every name
    batch_size: int
    dense: Mapping[str, torch.Tensor] | None = None  # per layer, its dense [rows, cols] weight: databases decode
    # against it (they do not store it); None: the model's weights now, copied to the host when a database needs them

    def dense_weights(self) -> Mapping[str, torch.Tensor]:
        """What a database of this model decodes against."""
        return self.dense if self.dense is not None else dense_weights(self.model, self.inventory)


def artifact_name(model_id: str, backend: str, levels: list[Level], meta: dict) -> str:
    """``<model>/<backend>-<hash of grid, data and rounding>``: one profile or database per distinct question."""
    rounding = {k: v for lv in levels for p in lv.parts for k, v in p.cache_tag.items()}  # a kind's rounding version
    key = json.dumps({"grid": sorted(lv.name for lv in levels), **rounding, **meta}, sort_keys=True)
    slug = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(model_id).name or model_id)
    return f"{slug}/{backend}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


class Workspace:
    """A cache root and the measurements kept in it."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = cache_dir(root)
        # the database opened last: reopened (digests checked again), it comes back with its parts still loaded; one
        # only, so a comparison over backends or grids holds one database's pinned parts at a time
        self._last: tuple[Path, LevelDatabase] | None = None
        for tmp in self.root.glob("**/.*.tmp-*") if self.root.is_dir() else ():
            remove_orphans(tmp.parent / tmp.name.split(".tmp-")[0].removeprefix("."))

    def path(self, kind: str, cal: Calibration, backend: str, levels: list[Level], suffix: str = "") -> Path:
        """Where the ``kind`` measurement of ``levels`` and ``backend`` on ``cal``'s windows lives. The model's dtype
        is part of the name (the weights and grid scales a bfloat16 run stores are not a float32 run's); float32
        adds no key, so the names of earlier caches hold."""
        dtype = next(cal.model.parameters()).dtype
        meta = cal.meta if dtype == torch.float32 else {**cal.meta, "dtype": str(dtype)}
        return self.root / kind / (artifact_name(cal.model_id, backend, levels, meta) + suffix)

    # ---- profiles ------------------------------------------------------------------------------------
    def profile(self, cal: Calibration, levels: list[Level], backend: str, path: str | None = None,
                with_database: bool = False) -> Profile:  # fmt: skip
        """The profile of ``levels``: loaded if saved, else measured and saved. ``path``: one the user named
        (refused if unusable, never re-measured). ``with_database``: the same pass builds the level database."""
        target = Path(path) if path else self.path("profiles", cal, backend, levels, ".parquet")
        if path:  # the user's file: refused in one line when unusable
            found = Profile.load(target)
            found.check(cal.inventory, levels, backend)
            log.info("reusing profile %s", target)
            return found
        if target.is_file():
            try:
                found = Profile.load(target)
                found.check(cal.inventory, levels, backend)
            except AllocatorError as exc:  # a cache entry: damaged or stale, so measured again
                log.warning("cached profile %s is unusable (%s): deleted, measuring again", target, exc)
                target.unlink(missing_ok=True)
            else:
                log.info("reusing profile %s", target)
                return found
        t0 = time.perf_counter()
        db_path = self.path("db", cal, backend, with_dense(levels))
        with contextlib.ExitStack() as stack:
            also = []
            if with_database and self._open_database(db_path, cal, levels) is None:
                self._check_database_space(db_path, cal, levels, backend)
                writer = DatabaseWriter(cal.inventory, with_dense(levels), backend, db_path, cal.seqs)
                also.append(stack.enter_context(writer))
            measured = Profile.measure(cal.model, cal.inventory, levels, backend, cal.seqs, cal.meta,
                                       cal.batch_size, also)  # fmt: skip
        measured.meta["measure_s"] = time.perf_counter() - t0
        measured.save(target)
        log.info("saved profile %s (%.1f s)", target, measured.meta["measure_s"])
        return measured

    def save_profile(self, cal: Calibration, found: Profile, levels: list[Level], backend: str) -> None:
        """Store ``found`` (e.g. with a new column) under its name."""
        found.save(self.path("profiles", cal, backend, levels, ".parquet"))

    # ---- level databases -----------------------------------------------------------------------------
    def database(self, cal: Calibration, levels: list[Level], backend: str) -> LevelDatabase:
        """The level database for ``levels`` (built once, cached)."""
        path = self.path("db", cal, backend, with_dense(levels))
        if (db := self._open_database(path, cal, levels)) is not None:
            return db
        self._check_database_space(path, cal, levels, backend)
        db = LevelDatabase.build(
            cal.model, cal.inventory, levels, backend, path, cal.seqs, cal.batch_size, dense=cal.dense_weights()
        )
        log.info("built level database %s (%.2f GB)", path, db.manifest["bytes"] / 1e9)
        return db

    def _check_database_space(self, path: Path, cal: Calibration, levels: list[Level], backend: str) -> None:
        """Refuse, before the calibration pass, a database the cache's disk cannot hold."""
        dtype = next(cal.model.parameters()).dtype
        needed = estimate_bytes(cal.inventory, with_dense(levels), not get_backend(backend).hessian, dtype)
        fixes = "pass --cache-dir on a larger disk, use fewer levels (a coarser --levels), or free space"
        check_space(path, needed, f"the level database of {len(levels)} levels", fixes)

    def find_database(self, cal: Calibration, levels: list[Level], backend: str) -> LevelDatabase | None:
        """The cached database holding ``levels`` for ``backend`` on ``cal``'s windows, or None (nothing built)."""
        return self._open_database(self.path("db", cal, backend, with_dense(levels)), cal, levels)

    def _open_database(self, path: Path, cal: Calibration, levels: list[Level]) -> LevelDatabase | None:
        """The cached database at ``path`` if it holds every level, else None (a stale one is rebuilt)."""
        if (path / "manifest.json").is_file():
            try:
                db = LevelDatabase.open(path, cal.inventory, cal.dense_weights())
            except AllocatorError as exc:  # an older format, a damaged manifest or block: built again
                log.warning("level database %s is unusable (%s): deleted, building it again", path, exc)
                shutil.rmtree(path, ignore_errors=True)
                return None
            if self._last is not None and self._last[0] == path and self._last[1].manifest == db.manifest:
                db = self._last[1]  # the same files, and the digests matched the weights at hand: its parts hold
            self._last = (path, db)
            if {lv.name for lv in levels} <= set(db.manifest["levels"]):
                return db
        return None

    def add_kl(self, cal: Calibration, found: Profile, levels: list[Level], backend: str, pool: int,
               again: bool = False, limit_s: float | None = None) -> bool:  # fmt: skip
        """Measure the profile's ``kl`` column (one layer compressed at a time) on ``pool`` windows, and save it
        (kept when the profile has one, unless ``again``). With ``limit_s``, nothing is measured when the column
        would take longer (one timed forward of the pool times the number of entries: an upper bound, as each
        entry runs only from its layer's block on). Returns whether the profile has the column."""
        if "kl" in found.table and not again:
            return True
        grid = with_dense(levels)
        problem = build_problem(cal.inventory, grid, Budget("sparsity", 0.0))
        db = self.database(cal, grid, backend)
        seqs = cal.seqs[:pool]
        fitness = KLFitness(cal.model, cal.inventory, problem, db, seqs, cal.batch_size)
        if limit_s is not None:
            entries = int(np.isfinite(problem.cost).sum()) - len(problem.units)  # the dense entries cost nothing
            dense = np.full(len(problem.units), [lv.name for lv in grid].index("dense"))
            estimate = _forward_s(fitness, dense) * entries
            found.meta["kl_estimate_s"] = estimate
            if estimate > limit_s:
                log.info("per-layer KL profile not measured: %d entries, about %.0f s (more than %.0f s)",
                         entries, estimate, limit_s)  # fmt: skip
                return False
        t0 = time.perf_counter()
        found.add_kl(fitness, problem, np.arange(len(seqs)))
        found.meta["kl_s"] = time.perf_counter() - t0
        self.save_profile(cal, found, levels, backend)
        return True

    # ---- dense references ----------------------------------------------------------------------------
    def dense(self, model: nn.Module, eval_seqs: torch.Tensor, kl_seqs: torch.Tensor, batch_size: int,
              cached: bool = True) -> DenseReference:  # fmt: skip
        """Dense perplexity and KL teacher of ``model`` (holding its dense weights); cached unless not ``cached``."""
        return dense_reference(model, eval_seqs, kl_seqs, batch_size, self.root / "dense" if cached else None)


def _forward_s(fitness: KLFitness, dense: np.ndarray) -> float:
    """Seconds of one dense forward of the fitness pool (the second: the first pays for warm-up)."""
    cuda = fitness.device.type == "cuda"
    fitness.set_parent(dense)
    if cuda:
        torch.cuda.synchronize(fitness.device)
    t0 = time.perf_counter()
    fitness.set_parent(dense)
    if cuda:
        torch.cuda.synchronize(fitness.device)
    return time.perf_counter() - t0
