"""Allocation methods, by name."""

from __future__ import annotations

from allocator.errors import AllocatorError
from allocator.search.base import Searcher
from allocator.search.evolution import Evolution
from allocator.search.knapsack import Knapsack
from allocator.search.optuna import OptunaSearch
from allocator.search.owl import OWL
from allocator.search.uniform import Uniform

SEARCHERS: dict[str, type] = {"uniform": Uniform, "owl": OWL, "knapsack": Knapsack, "evolution": Evolution,
                             "optuna": OptunaSearch}  # fmt: skip
NEEDS_PROFILE = {"owl", "knapsack", "optuna"}


def get_searcher(name: str, **options) -> Searcher:
    """Instantiate the method called ``name``."""
    if name not in SEARCHERS:
        raise AllocatorError(f"unknown method {name!r}: choose one of {', '.join(SEARCHERS)}")
    return SEARCHERS[name](**options)
