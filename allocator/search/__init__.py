"""Allocation methods, by name."""

from __future__ import annotations

from allocator.errors import AllocatorError
from allocator.search.base import Searcher
from allocator.search.uniform import Uniform

SEARCHERS: dict[str, type] = {"uniform": Uniform}


def get_searcher(name: str, **options) -> Searcher:
    """Instantiate the method called ``name``."""
    if name not in SEARCHERS:
        raise AllocatorError(f"unknown method {name!r}: choose one of {', '.join(SEARCHERS)}")
    return SEARCHERS[name](**options)
