"""allocator: search-based non-uniform compression of LLMs under a global budget."""

from __future__ import annotations

from allocator.budget import Budget, Problem, build_problem, summarize
from allocator.errors import AllocatorError
from allocator.levels import Level, parse_grid, parse_level
from allocator.model import Inventory, load_model
from allocator.pipeline import RunResult, run
from allocator.plan import Plan
from allocator.session import RunConfig

__version__ = "0.1.0"

__all__ = [
    "AllocatorError",
    "Budget",
    "Inventory",
    "Level",
    "Plan",
    "Problem",
    "RunConfig",
    "RunResult",
    "build_problem",
    "load_model",
    "parse_grid",
    "parse_level",
    "run",
    "summarize",
]
