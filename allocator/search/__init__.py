"""Allocation methods by name, their options, and :func:`allocate`: the one way from a Problem to a plan."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import Field, dataclass, field
from typing import Any

import numpy as np

from allocator.budget import Problem
from allocator.errors import AllocatorError
from allocator.levels import Level
from allocator.search.base import NEEDS, SearchContext, Searcher, SearchResult
from allocator.search.evolution import Evolution
from allocator.search.fitted import Fitted
from allocator.search.guided import Guided
from allocator.search.knapsack import Knapsack
from allocator.search.optuna import OptunaSearch
from allocator.search.owl import OWL
from allocator.search.uniform import Uniform

SEARCHERS: dict[str, type[Searcher]] = {"uniform": Uniform, "owl": OWL, "knapsack": Knapsack, "fitted": Fitted,
                                        "evolution": Evolution, "guided": Guided, "optuna": OptunaSearch}  # fmt: skip


def option_fields() -> dict[str, tuple[Field, list[str]]]:
    """Every option of every searcher: name -> (its field, the methods that take it).

    Methods sharing an option name share its meaning, type and default (a test holds them to it).
    """
    out: dict[str, tuple[Field, list[str]]] = {}
    for method, cls in SEARCHERS.items():
        for f in cls.options():
            out.setdefault(f.name, (f, []))[1].append(method)
    return out


def make_searcher(name: str, options: dict[str, Any] | None = None, **fields_: Any) -> Searcher:
    """The method called ``name`` with its options taken from ``options`` (other methods' are ignored).

    ``options`` may hold the options of every method (as ``RunConfig.options`` does); a name no method
    knows is refused, so a typo is not silently ignored. ``fields_`` go to this method only (any of its
    fields, options or settings made in code), and one it lacks is refused.
    """
    if name not in SEARCHERS:
        raise AllocatorError(f"unknown method {name!r}: choose one of {', '.join(SEARCHERS)}")
    known = option_fields()
    unknown = sorted(set(options or {}) - set(known))
    if unknown:
        raise AllocatorError(f"unknown search options {unknown}: known are {', '.join(sorted(known))}")
    cls = SEARCHERS[name]
    mine = {f.name for f in cls.options()}
    alien = sorted(set(fields_) - {f.name for f in dataclasses.fields(cls)})
    if alien:
        raise AllocatorError(f"{name} has no option {alien}")
    return cls(**{**{k: v for k, v in (options or {}).items() if k in mine}, **fields_})


@dataclass
class Allocation:
    """What :func:`allocate` returns: the plan's levels, checked against every budget, and the search's data."""

    method: str
    choice: np.ndarray
    assignment: dict[str, Level]
    history: list[dict] = field(default_factory=list)
    front: list[dict] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)
    search_s: float = 0.0
    costs: np.ndarray | None = None
    record: dict = field(default_factory=dict)


def allocate(problem: Problem, searcher: Searcher, ctx: SearchContext | None = None) -> Allocation:
    """Run ``searcher`` on ``problem`` and check its answer once, the same way for every method.

    Refuses before searching when the searcher needs what it was not given (a profile, a fitness, a
    latency table), and after when the answer picks a level a unit cannot take or breaks a budget.
    """
    ctx = ctx or SearchContext()
    have = {"profile": problem.sensitivity is not None, "outliers": problem.outlier_ratio is not None,
            "fitness": ctx.fitness is not None, "latency": problem.latency_cost is not None}  # fmt: skip
    missing = [need for need in NEEDS if need in searcher.needs() and not have[need]]
    if missing:
        hints = {"profile": "a sensitivity profile", "outliers": "outlier ratios from a sensitivity profile",
                 "fitness": "a fitness on the real model (a level database)",
                 "latency": "a latency table (--latency-table)"}  # fmt: skip
        raise AllocatorError(f"{searcher.name} needs {' and '.join(hints[m] for m in missing)}")
    t0 = time.perf_counter()
    result: SearchResult = searcher.search(problem, ctx)
    seconds = time.perf_counter() - t0
    choice = np.asarray(result.choice, dtype=int)
    units = np.arange(len(problem.units))
    if choice.shape != units.shape or not np.isfinite(problem.cost[units, choice]).all():
        raise AllocatorError(f"{searcher.name} returned a level some unit cannot take: report this with the grid")
    if not problem.feasible(choice):
        over = [f"{b}: {problem.in_budget_units(b, problem.summed(c, choice))}" for b, c, lim in problem.constraints()]
        raise AllocatorError(f"{searcher.name} returned a plan over its budget ({'; '.join(over)}): report this")
    return Allocation(searcher.name, choice, problem.assignment(choice), result.history, result.front,
                      result.stats, seconds, result.costs, result.record)  # fmt: skip


__all__ = ["SEARCHERS", "Allocation", "SearchContext", "SearchResult", "Searcher", "allocate", "make_searcher",
           "option_fields"]  # fmt: skip
