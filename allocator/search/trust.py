"""What an Optuna storage may hold that this process did not write: a torn journal line, and pickled sampler state.

* A torn line: a worker killed while appending to a journal file leaves a last line without its newline. Optuna
  5.1's reader skips such a line, but its next append is glued onto it, and from then on every read of the journal
  fails on the merged line. :func:`repair_journal` cuts the torn tail, under the journal's own lock (so a live
  worker's append is never cut), with a warning.
* Trials another program wrote: :func:`malformed` finds a finished trial or baseline whose plan, fitness or size is
  not what this search writes.
* Pickled state: Optuna's CMA-ES sampler keeps its optimizer pickled (hex, split over trial system attributes
  ``cma:optimizer:0``, ``:1``, …) in the study storage, and unpickles the latest when it samples; unpickling runs
  whatever code the writer put there. :func:`check_pickled_state` refuses CMA-ES on a study this process did not
  create. No other sampler allocator offers (TPE, GP, NSGA-II) loads pickles.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from allocator.errors import AllocatorError

log = logging.getLogger(__name__)
PICKLING = ("cmaes",)  # samplers whose state is unpickled from the storage
_CREATED: set[tuple[str, str]] = set()  # (storage, study name) pairs this process created


def repair_journal(path: Path, lock) -> None:
    """Cut a torn last line (no newline: its write was killed) off the journal at ``path``.

    The lock is taken only for a journal that looks torn, and the tail read again under it: a live worker's
    append in progress has ended by then (appends hold the lock), so only a killed write is cut."""
    if not _torn(path):
        return
    lock.acquire()
    try:
        data = path.read_bytes()
        keep = data.rfind(b"\n") + 1
        if keep < len(data):
            os.truncate(path, keep)
            log.warning("optuna journal %s ended in a torn line (%d bytes, a write that was killed): cut off",
                        path, len(data) - keep)  # fmt: skip
    finally:
        lock.release()


def _torn(path: Path) -> bool:
    if not path.is_file() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


def check_pickled_state(storage, url: str | None, study_name: str, sampler: str) -> None:
    """Remember the studies this process creates in ``storage`` (None: in memory, nothing to check); refuse a
    pickling sampler on one it did not create."""
    if storage is None or url is None:
        return
    if study_name not in {s.study_name for s in storage.get_all_studies()}:
        _CREATED.add((url, study_name))  # created next, by this process
    elif sampler in PICKLING and (url, study_name) not in _CREATED:
        raise AllocatorError(
            f"CMA-ES keeps its state pickled in the study storage ({url}, study {study_name!r}, which another "
            "process created) and unpickling it could run code someone else wrote: resume with --sampler tpe or "
            "start a new storage"
        )


def malformed(study, complete: list, names: list[str], units: int) -> str | None:
    """The first finished trial or baseline whose plan, fitness or size is not what this search writes, or None."""
    baselines = study.user_attrs.get("baselines", {})
    if not isinstance(baselines, dict):
        return "baselines attribute"
    for what, attrs, keys in [*((f"trial {t.number}", t.user_attrs, ("fitness", "bytes")) for t in complete),
                              *((f"baseline {n!r}", b, ("fitness",)) for n, b in baselines.items())]:  # fmt: skip
        plan = attrs.get("plan") if isinstance(attrs, dict) else None
        if not (isinstance(plan, list) and len(plan) == units and all(isinstance(p, str) and p in names for p in plan)
                and all(_finite(attrs.get(k)) for k in keys)):  # fmt: skip
            return what
    return None


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))
