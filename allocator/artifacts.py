"""What a session measures once and keeps: sensitivity profiles (Parquet) and level databases.

Both are named by the model, backend, grid and calibration windows (:func:`artifact_name`), so a run on
the same model and data reuses them; one that is stale (an older format) or cut short is measured again.
Profiles live under ``--profiles-dir``; databases under the allocator cache folder.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path

import numpy as np

from allocator.backends.database import DatabaseWriter, LevelDatabase
from allocator.budget import Budget, build_problem
from allocator.errors import AllocatorError
from allocator.levels import Level, with_dense
from allocator.model import cache_dir
from allocator.profile import Profile, artifact_name
from allocator.session import Session

log = logging.getLogger(__name__)


def profile_file(session: Session, levels: list[Level], backend: str) -> Path:
    """Where the profile for ``levels`` and ``backend`` on this session's data is saved."""
    name = artifact_name(session.loaded.model_id, backend, levels, session.calib_meta) + ".parquet"
    return Path(session.config.profiles_dir) / name


def profile(
    session: Session, levels: list[Level], backend: str, path: str | None = None, with_database: bool = False
) -> Profile:
    """The sensitivity profile of this model for ``levels``: loaded if saved, else measured and saved.

    ``path``: a profile the user named (refused if unusable, never re-measured). ``with_database``: the
    caller will need the level database too, so the profile's pass over the model builds it as well.
    """
    target = Path(path) if path else profile_file(session, levels, backend)
    if target.is_file() or path:
        try:
            found = Profile.load(target)
        except AllocatorError:
            if path:
                raise
            found = None  # a cached profile of an older version (or cut short): measure it again
        if found is not None:
            found.check(session.inventory, levels, backend)
            log.info("reusing profile %s", target)
            return found
    session.restore_()
    t0 = time.perf_counter()
    db_path = _database_path(session, levels, backend)
    with contextlib.ExitStack() as stack:
        also = []
        if with_database and _open_database(session, db_path, levels) is None:
            writer = DatabaseWriter(session.inventory, with_dense(levels), backend, db_path, session.calib)
            also.append(stack.enter_context(writer))
        measured = Profile.measure(session.model, session.inventory, levels, backend, session.calib,
                                   session.calib_meta, session.config.batch_size, also)  # fmt: skip
    measured.meta["measure_s"] = time.perf_counter() - t0
    measured.save(target)
    log.info("saved profile %s (%.1f s)", target, measured.meta["measure_s"])
    return measured


def database(session: Session, levels: list[Level], backend: str) -> LevelDatabase:
    """The level database for ``levels`` (built once, cached under the allocator cache folder)."""
    path = _database_path(session, levels, backend)
    if (db := _open_database(session, path, levels)) is not None:
        return db
    session.restore_()
    db = LevelDatabase.build(session.model, session.inventory, levels, backend, path, session.calib,
                             session.config.batch_size)  # fmt: skip
    log.info("built level database %s (%.2f GB)", path, db.manifest["bytes"] / 1e9)
    return db


def add_kl_column(session: Session, found: Profile, grid: list[Level], backend: str, pool: int) -> None:
    """Measure the profile's ``kl`` column (one layer compressed at a time) on ``pool`` calibration windows."""
    from allocator.fitness import KLFitness

    grid = with_dense(grid)
    problem = build_problem(session.inventory, grid, Budget("sparsity", 0.0))
    db = database(session, grid, backend)
    seqs = session.calib[:pool]
    t0 = time.perf_counter()
    fitness = KLFitness(session.model, session.inventory, problem, db, seqs, session.config.batch_size)
    found.add_kl(fitness, problem, np.arange(len(seqs)))
    found.meta["kl_s"] = time.perf_counter() - t0


def ensure_kl(session: Session, found: Profile, levels: list[Level], backend: str, pool: int) -> None:
    """Measure the ``kl`` column once and save it into the cached profile."""
    if "kl" not in found.table:
        add_kl_column(session, found, levels, backend, pool)
        found.save(profile_file(session, levels, backend))


def measure_profile(session: Session, levels: list[Level], backend: str, kl_pool: int = 0,
                    output: str | None = None) -> Profile:  # fmt: skip
    """``allocator profile``: the cached profile (measured if new), with a ``kl`` column on ``kl_pool``
    windows if asked, also saved to ``output``."""
    if kl_pool < 0:
        raise AllocatorError(f"--kl-pool must be >= 0 windows, got {kl_pool}")
    found = profile(session, levels, backend, with_database=bool(kl_pool))
    if kl_pool:
        add_kl_column(session, found, levels, backend, kl_pool)
        found.save(profile_file(session, levels, backend))
    if output:
        found.save(output)
    return found


def _database_path(session: Session, levels: list[Level], backend: str) -> Path:
    """One database per grid (``dense`` is always stored, so a grid with or without it is the same)."""
    name = artifact_name(session.loaded.model_id, backend, with_dense(levels), session.calib_meta)
    return cache_dir() / "db" / name


def _open_database(session: Session, path: Path, levels: list[Level]) -> LevelDatabase | None:
    """The cached database at ``path`` if it holds every level, else None."""
    if (path / "manifest.json").is_file():
        try:
            db = LevelDatabase.open(path, session.inventory)
        except AllocatorError as exc:  # an older format or a corrupt manifest: build it again
            log.info("not reusing %s: %s", path, exc)
            return None
        if {lv.name for lv in levels} <= set(db.manifest["levels"]):
            return db
    return None
