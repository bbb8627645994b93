"""allocator: search-based non-uniform compression of LLMs under a global budget."""

from __future__ import annotations

from allocator.budget import Budget, Problem, build_problem, summarize
from allocator.config import RunConfig
from allocator.errors import AllocatorError
from allocator.levels import Level, parse_grid, parse_level
from allocator.model import Inventory, load_model
from allocator.pipeline import RunResult, run
from allocator.plan import Plan
from allocator.search import SEARCHERS, Allocation, SearchContext, allocate, make_searcher

__version__ = "0.1.0"

__all__ = [
    "SEARCHERS",
    "Allocation",
    "AllocatorError",
    "Budget",
    "Inventory",
    "Level",
    "Plan",
    "Problem",
    "RunConfig",
    "RunResult",
    "SearchContext",
    "allocate",
    "build_problem",
    "load_model",
    "make_searcher",
    "parse_grid",
    "parse_level",
    "run",
    "summarize",
]
