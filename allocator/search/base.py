"""What every searcher is: a dataclass whose fields are its options, which declares what it needs.

A searcher sees a :class:`Problem` (numbers), never a model; a real-model fitness comes beside the
problem in a :class:`SearchContext`. Options are declared once, with :func:`option` (help text, type,
choices); the command line, ``RunConfig.options`` and ``allocator compare`` are generated from them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from allocator.budget import Problem
from allocator.errors import AllocatorError

# a profile's error matrix, a profile's outlier ratios (OWL), the real model's fitness, a latency table
NEEDS = ("profile", "outliers", "fitness", "latency")


class Fitness(Protocol):
    """Scores a choice on a subset of a fixed pool of calibration sequences (lower is better)."""

    pool_size: int
    seq_len: int

    def set_parent(self, choice: np.ndarray) -> None: ...

    def __call__(self, choice: np.ndarray, batch: np.ndarray) -> float: ...


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, kind: type | None = None) -> Any:
    """A searcher option: a dataclass field that also becomes ``--name`` on the command line.

    ``kind`` is the value's type where the default (None) does not show it.
    """
    return field(default=default, metadata={"help": help, "choices": choices, "kind": kind or type(default)})


@dataclass(frozen=True)
class SearchContext:
    """What one search runs with besides the problem: seed, real-model fitness, where to checkpoint."""

    seed: int = 0
    fitness: Fitness | None = None
    workdir: Path | None = None  # a resumable searcher keeps its checkpoint or study here (None: none kept)
    resume: bool = False  # continue the search killed in ``workdir``
    measured: tuple = ()  # (choice, KL) of plans measured on the pool's first windows (the fitted search's), shared
    # called after each generation with its record and the parent; a benchmark scores the parent on held-out
    # windows afterwards (it must not touch the model meanwhile: the fitness owns it)
    observer: Callable[[dict, np.ndarray], None] | None = None


@dataclass
class SearchResult:
    """A searcher's answer: one level index per unit, and what it learnt on the way (as data)."""

    choice: np.ndarray
    history: list[dict] = field(default_factory=list)  # one record per generation or trial
    front: list[dict] = field(default_factory=list)  # a multi-objective study's Pareto plans
    stats: dict[str, float] = field(default_factory=dict)  # e.g. the knapsack's optimality gap
    costs: np.ndarray | None = None  # [U, K] a cost model the search learnt (the fitted search's fitted costs)
    record: dict = field(default_factory=dict)  # JSON-able details the run folder keeps (every measured plan)


class Searcher:
    """Base of every allocation method; subclasses are dataclasses whose :func:`option` fields are options.

    Subclasses check their options in ``__post_init__`` (one line naming the flag), so a bad option is
    refused before any model work.
    """

    name: ClassVar[str]

    def needs(self) -> frozenset[str]:
        """What :func:`allocate` must be given, a subset of :data:`NEEDS` (it may depend on the options)."""
        return frozenset()

    def check(self) -> None:
        """Checks that touch the outside world (a study's storage), run once before any model work."""

    def sensitivity(self, asked: str) -> str:
        """The profile column (``--sensitivity``) the problem's error matrix must hold for this searcher."""
        return asked

    def fitness_pool(self, fit_seqs: int) -> int | None:
        """Calibration windows its fitness scores on (None: all of them; the fitted search: ``--fit-seqs``)."""
        return None

    def search(self, problem: Problem, ctx: SearchContext) -> SearchResult:
        """One level per unit of ``problem`` within its budgets; the same context gives the same answer."""
        raise NotImplementedError

    @classmethod
    def options(cls) -> list[Field]:
        """The fields that are options (others are internal state or settings made in code)."""
        return [f for f in fields(cls) if "help" in f.metadata]  # type: ignore[arg-type]

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Each option's default value."""
        return {f.name: f.default for f in cls.options() if f.default is not MISSING}


def at_least(flag: str, value: float, low: float) -> None:
    """Refuse an option below ``low``, naming its flag (searchers' ``__post_init__`` checks)."""
    if value < low:
        raise AllocatorError(f"{flag} must be at least {low:g}, got {value}")


def one_of(flag: str, value: str, allowed: tuple[str, ...]) -> None:
    """Refuse an option outside ``allowed``, naming its flag and the choices."""
    if value not in allowed:
        raise AllocatorError(f"unknown {flag} {value!r}: choose one of {', '.join(allowed)}")
