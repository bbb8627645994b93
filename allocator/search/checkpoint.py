"""Search checkpoints read back for ``--resume``: every field checked before a search trusts it.

A checkpoint lives in the user's run folder, so a damaged one (not JSON, a list, a field missing or of the wrong
type, a plan off the grid or over the budget) is refused in one line naming it and the fix, never deleted: it may
be the only record of hours of search.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from allocator.budget import Problem
from allocator.errors import AllocatorError

Check = Callable[[object], bool]
FIX = "delete it to start over or pick another output folder"


def read_checkpoint(path: Path | None, key: dict, fields: dict[str, Check]) -> dict | None:
    """The checkpoint at ``path`` (None: there is none) if it was written by the search ``key`` and each of
    ``fields`` passes its check."""
    if path is None or not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AllocatorError(f"checkpoint {path} is not JSON ({exc}): {FIX}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("key"), dict):
        what = "has no search key" if isinstance(saved, dict) else f"is a JSON {type(saved).__name__}, not an object"
        raise AllocatorError(f"checkpoint {path} {what}: {FIX}")
    if saved["key"] != key:
        raise AllocatorError(
            f"checkpoint {path} belongs to another search (model, grid, budget, seed or schedule differ): use the "
            "same settings or another output folder"
        )
    for name, check in fields.items():
        if name not in saved or not check(saved[name]):
            got = repr(saved[name])[:80] if name in saved else "absent"
            raise AllocatorError(f"checkpoint {path}: field {name!r} is missing or malformed ({got}): {FIX}")
    return saved


def count(value: object) -> bool:
    """A whole number >= 0."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def number(value: object) -> bool:
    """A finite number."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def records(value: object) -> bool:
    """A list of JSON objects (a history)."""
    return isinstance(value, list) and all(isinstance(r, dict) for r in value)


def rng_state(value: object) -> bool:
    """A state numpy's default generator accepts."""
    try:
        np.random.default_rng().bit_generator.state = value
    except (TypeError, ValueError, KeyError):
        return False
    return True


def plan_in(problem: Problem, within_budget: bool = True) -> Check:
    """A choice of ``problem``: one applicable level index per unit (and, ``within_budget``, keeping every budget)."""

    def check(value: object) -> bool:
        if not isinstance(value, list) or len(value) != len(problem.units) or not all(map(count, value)):
            return False
        if max(value, default=0) >= len(problem.levels):
            return False
        choice = np.array(value, dtype=int)
        applicable = bool(np.isfinite(problem.cost[np.arange(len(choice)), choice]).all())
        return applicable and (problem.feasible(choice) or not within_budget)

    return check


def scores_of(problem: Problem) -> Check:
    """Plans of ``problem`` (comma-joined level indices, as the searches key them) to finite numbers."""
    plan = plan_in(problem, within_budget=False)

    def check(value: object) -> bool:
        return isinstance(value, dict) and all(number(v) and plan(_indices(k)) for k, v in value.items())

    return check


def pairs_of(problem: Problem) -> Check:
    """[plan, plan, number] triples (a child, its parent, their difference on shared tokens), plans as keys."""
    plan = plan_in(problem, within_budget=False)

    def check(value: object) -> bool:
        return isinstance(value, list) and all(
            isinstance(p, list) and len(p) == 3 and all(isinstance(k, str) and plan(_indices(k)) for k in p[:2])
            and number(p[2]) for p in value)  # fmt: skip

    return check


def _indices(key: str) -> list[int] | None:
    try:
        return [int(k) for k in key.split(",")]
    except ValueError:
        return None
