"""allocator: search-based non-uniform compression of LLMs under a global budget (see docs/api.md)."""

from __future__ import annotations

from allocator.about import __version__
from allocator.apply import apply_
from allocator.budget import Budget, Problem, achieved, build_problem
from allocator.errors import AllocatorError
from allocator.inventory import Inventory
from allocator.levels import Level, parse_grid, parse_level
from allocator.model import load_model
from allocator.pipeline import RunResult, run
from allocator.plan import Plan
from allocator.search import SEARCHERS, Allocation, SearchContext, allocate, make_searcher
from allocator.spec import RunConfig, RunSpec, resolve

__all__ = ["SEARCHERS", "Allocation", "AllocatorError", "Budget", "Inventory", "Level", "Plan", "Problem", "RunConfig",
           "RunResult", "RunSpec", "SearchContext", "__version__", "achieved", "allocate", "apply_", "build_problem",
           "load_model", "make_searcher", "parse_grid", "parse_level", "resolve", "run"]  # fmt: skip
