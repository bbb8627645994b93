"""The searcher protocol: a searcher sees a Problem (numbers), never a model."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from allocator.budget import Problem


class Searcher(Protocol):
    """Pick one level index per unit of ``problem`` within its budget; same seed, same answer."""

    def search(self, problem: Problem, seed: int) -> np.ndarray: ...
