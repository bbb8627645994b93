"""Global budgets and the numeric Problem that every searcher solves.

A budget bounds one cost summed over layers: ``sparsity=0.5`` keeps at most half of the
compressible weights, ``bits=3.5`` stores them in at most 3.5 bits per weight on average
(scales and metadata included), ``bytes=5e7`` bounds their storage. ``latency=12.5`` (ms) and
``speedup=1.3`` (x dense) hold the plan to a latency table measured on the target GPU at a
given token count: the cost is each layer's looked-up time, the limit the target minus the
model's measured non-linear overhead. Searchers see only the :class:`Problem`: cost and error
matrices over (decision unit x level) and a limit.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np

from allocator.errors import AllocatorError
from allocator.formats import storage_bits, unfit
from allocator.inventory import Inventory, Layer
from allocator.latency.table import LatencyModel
from allocator.levels import Level

_KINDS = ("sparsity", "bits", "bytes", "latency", "speedup")
LATENCY_KINDS = ("latency", "speedup")
_REL_TOL = 1e-12  # float slack when comparing an exact integer cost to a float limit


def ceiling(limit: float) -> float:
    """The largest total that keeps a budget of ``limit`` (float summation noise forgiven)."""
    return limit * (1 + _REL_TOL) + 1e-9


@dataclass(frozen=True)
class Budget:
    """A global budget: ``kind`` in sparsity | bits | bytes | latency | speedup and its target value."""

    kind: str
    value: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse ``"sparsity=0.5"``, ``"bits=3.5"``, ``"bytes=5e7"``, ``"latency=12.5"`` or ``"speedup=1.3"``."""
        kind, sep, raw = text.partition("=")
        kind = kind.strip().lower()
        if not sep or kind not in _KINDS:
            raise AllocatorError(f"unknown budget {text!r}: write KIND=VALUE with KIND one of {', '.join(_KINDS)}")
        try:
            value = float(raw)
        except ValueError:
            raise AllocatorError(f"budget {text!r}: {raw!r} is not a number") from None
        return cls(kind, value).checked()

    def checked(self) -> Budget:
        """Return self if the value is in range for its kind, else raise naming the range."""
        if not math.isfinite(self.value):
            raise AllocatorError(f"target {self.kind} must be a finite number, got {self.value}: e.g. --target bits=4")
        if self.kind == "sparsity" and not 0 <= self.value < 1:
            raise AllocatorError(f"target sparsity must be in [0, 1), got {self.value}: e.g. --target sparsity=0.5")
        if self.kind in ("bits", "bytes", "latency") and not self.value > 0:
            raise AllocatorError(f"target {self.kind} must be > 0, got {self.value}")
        if self.kind == "speedup" and not self.value >= 1:
            raise AllocatorError(f"target speedup must be >= 1 (x dense), got {self.value}")
        return self

    def __str__(self) -> str:
        return f"{self.kind}={self.value:g}"

    def cost(self, level: Level, layer: Layer, latency: LatencyModel | None = None) -> float:
        """The budgeted cost of one layer at one level (kept weights, storage bits or bytes, ms)."""
        if self.kind in LATENCY_KINDS:
            model = self._needs(latency)
            return model.table.layer_ms(layer, level, model.tokens)
        if self.kind == "sparsity":
            return level.kept_params(layer.rows, layer.cols)
        bits = storage_bits(level, layer.rows, layer.cols)
        return bits if self.kind == "bits" else bits / 8

    def limit(self, inventory: Inventory, latency: LatencyModel | None = None) -> float:
        """The largest total cost allowed for this model (for latency: the linear layers' share)."""
        if self.kind in LATENCY_KINDS:
            model = self._needs(latency)
            total = self.value if self.kind == "latency" else model.table.dense_ms(inventory, model.tokens) / self.value
            return total - model.table.overhead_ms(model.tokens)
        if self.kind == "sparsity":
            return (1 - self.value) * inventory.params
        if self.kind == "bits":
            return self.value * inventory.params
        return self.value

    def _needs(self, latency: LatencyModel | None) -> LatencyModel:
        if latency is None:
            raise AllocatorError(
                f"budget {self} needs a latency table: pass --latency-table profiles/latency/GPU/MODEL.csv "
                "(made by `allocator latency measure`)"
            )
        return latency


def achieved(assignment: dict[str, Level], inventory: Inventory) -> dict[str, float]:
    """Exact achieved sparsity, average bits and bytes of an assignment (every budget kind)."""
    kept = sum(assignment[lay.name].kept_params(lay.rows, lay.cols) for lay in inventory.layers)
    bits = sum(storage_bits(assignment[lay.name], lay.rows, lay.cols) for lay in inventory.layers)
    return {
        "params": inventory.params,
        "kept_params": kept,
        "sparsity": 1 - kept / inventory.params,
        "bits": bits / inventory.params,
        "bytes": bits / 8,
    }


@dataclass(frozen=True)
class Problem:
    """What a searcher sees: pick one level per unit so that the summed cost stays under ``limit``.

    A unit is one layer, or one tie group whose layers share a level. ``cost[u, k]`` is +inf
    where level k cannot compress unit u. ``sensitivity`` (the predicted damage of each unit at each level:
    a profile column or fitted costs) and ``outlier_ratio``
    (OWL) are optional: uniform needs neither. Complete once built and read-only (its arrays too):
    a profile gives a new problem (:meth:`with_profile`); the real-model fitness is built from a
    problem and handed to the searcher beside it, never stored in it.
    """

    units: tuple[tuple[str, ...], ...]
    levels: tuple[Level, ...]
    cost: np.ndarray  # [U, K]
    limit: float
    budget: Budget | None = None
    params: int = 0  # compressible parameters, to state costs in the budget's own units
    extra: tuple[tuple[Budget, np.ndarray, float], ...] = ()  # more budgets held at once
    sensitivity: np.ndarray | None = None  # [U, K] predicted damage (``--sensitivity``: a profile column, fitted costs)
    outlier_ratio: np.ndarray | None = None  # [U] OWL's layer outlier ratio
    bytes_cost: np.ndarray | None = None  # [U, K] storage bytes: the second objective of a Pareto front
    latency_cost: np.ndarray | None = None  # [U, K] linear-layer ms from a latency table
    blocks: np.ndarray | None = None  # [U] decoder block of each unit (its first layer's)

    def __post_init__(self) -> None:
        put = object.__setattr__  # frozen: the normalised fields are set once, here
        put(self, "units", tuple(tuple(u) for u in self.units))
        put(self, "levels", tuple(self.levels))
        put(self, "extra", tuple((b, _frozen(c), lim) for b, c, lim in self.extra))
        for name in ("cost", "sensitivity", "outlier_ratio", "bytes_cost", "latency_cost", "blocks"):
            put(self, name, _frozen(getattr(self, name)))

    def with_sensitivity(self, matrix: np.ndarray, outlier_ratio: np.ndarray | None = None) -> Problem:
        """The same problem with a sensitivity matrix (and OWL's outlier ratios)."""
        if np.shape(matrix) != self.cost.shape:
            raise AllocatorError(f"sensitivity matrix {np.shape(matrix)} does not match the problem {self.cost.shape}")
        ratio = self.outlier_ratio if outlier_ratio is None else outlier_ratio
        return replace(self, sensitivity=matrix, outlier_ratio=ratio)

    def with_outliers(self, outlier_ratio: np.ndarray) -> Problem:
        """The same problem with OWL's outlier ratio per unit ([U])."""
        if np.shape(outlier_ratio) != (len(self.units),):
            raise AllocatorError(f"outlier ratios {np.shape(outlier_ratio)} do not match {len(self.units)} units")
        return replace(self, outlier_ratio=outlier_ratio)

    def objective(self, name: str) -> np.ndarray:
        """The [U, K] cost of a Pareto objective: ``bytes`` or ``latency`` (needs a latency table)."""
        matrix = {"bytes": self.bytes_cost, "latency": self.latency_cost}.get(name)
        if matrix is None:
            raise AllocatorError(f"objective {name!r} needs its cost: pass --latency-table for latency")
        return matrix

    def summed(self, matrix: np.ndarray, choice: np.ndarray) -> float:
        """A per-unit matrix [U, K] (a cost, an error) summed over one choice (one level index per unit)."""
        return float(matrix[np.arange(len(self.units)), choice].sum())

    def total_cost(self, choice: np.ndarray) -> float:
        """Summed primary cost of a choice."""
        return self.summed(self.cost, choice)

    def total_sensitivity(self, choice: np.ndarray) -> float:
        """Summed sensitivity of a choice (the prediction of its damage)."""
        if self.sensitivity is None:
            raise AllocatorError("this problem has no sensitivity profile")
        return self.summed(self.sensitivity, choice)

    def constraints(self) -> list[tuple[Budget | None, np.ndarray, float]]:
        """Every budget as (budget, cost matrix, limit), the primary one first."""
        return [(self.budget, self.cost, self.limit), *self.extra]

    def feasible(self, choice: np.ndarray) -> bool:
        """True when the choice keeps every budget."""
        return all(self.summed(c, choice) <= ceiling(lim) for _, c, lim in self.constraints())

    def in_budget_units(self, budget: Budget | None, total: float) -> str:
        """A total cost stated as the budget's quantity (``sparsity 0.4987``), for messages."""
        if budget is None or not self.params:
            return f"cost {total:.6g}"
        if budget.kind == "sparsity":
            return f"sparsity {1 - total / self.params:.4f}"
        if budget.kind in LATENCY_KINDS:
            return f"linear-layer time {total:.4f} ms"
        return f"bits {total / self.params:.4f}" if budget.kind == "bits" else f"bytes {total:.6g}"

    def reach_error(self) -> AllocatorError | None:
        """An error naming the achievable range when even the cheapest choice breaks a budget."""
        for budget, cost, limit in self.constraints():
            cheapest = float(np.min(cost, axis=1).sum())
            if cheapest > ceiling(limit):
                richest = float(np.where(np.isfinite(cost), cost, -np.inf).max(axis=1).sum())
                return AllocatorError(
                    f"budget {budget} is out of reach: this grid spans {self.in_budget_units(budget, richest)} "
                    f"to {self.in_budget_units(budget, cheapest)}; loosen the target or add more compressed levels"
                )
        return None

    def assignment(self, choice: np.ndarray) -> dict[str, Level]:
        """Expand a unit choice to one level per layer."""
        return {name: self.levels[k] for unit, k in zip(self.units, choice, strict=True) for name in unit}


PER = ("layer", "tie-group", "expert-role")  # what one unit of a plan is


def build_problem(
    inventory: Inventory, levels: list[Level], budget: Budget, per: str = "layer", extra: list[Budget] | None = None,
    latency: LatencyModel | None = None,
) -> Problem:  # fmt: skip
    """The cost matrix of every unit at every level under ``budget`` (and any ``extra`` budgets).

    ``per="tie-group"`` makes q/k/v and gate/up of a block one unit each, as vLLM requires;
    ``per="expert-role"`` does too, and makes all routed experts of a block one unit per projection
    (``experts.*.down_proj``): one level per expert role instead of one per expert;
    ``latency`` (a measured table and a token count) prices latency and speed-up budgets.
    """
    if per not in PER:
        raise AllocatorError(f"--per must be one of {', '.join(PER)}, got {per!r}")
    units = [(lay.name,) for lay in inventory.layers] if per == "layer" else list(inventory.groups)
    if per == "expert-role":
        roles: dict[str, list[str]] = {}
        for group in units:
            roles.setdefault(re.sub(r"\.experts\.\d+\.", ".experts.*.", group[0]), []).extend(group)
        units = [tuple(names) for names in roles.values()]

    def matrix(b: Budget) -> np.ndarray:
        cost = np.zeros((len(units), len(levels)))
        for u, unit in enumerate(units):
            layers = [inventory[name] for name in unit]
            for k, level in enumerate(levels):
                fits = not any(unfit(level, lay.rows, lay.cols) for lay in layers)
                cost[u, k] = sum(b.cost(level, lay, latency) for lay in layers) if fits else np.inf
        return cost

    cost = matrix(budget)
    if np.isinf(cost).all(axis=1).any():
        bad = [unit[0] for unit, row in zip(units, cost, strict=True) if np.isinf(row).all()]
        raise AllocatorError(f"no level of the grid applies to {bad}: add a level such as 'dense' to the grid")
    more = tuple((b, matrix(b), b.limit(inventory, latency)) for b in extra or [])
    return Problem(
        units, levels, cost, budget.limit(inventory, latency), budget=budget, params=inventory.params, extra=more,
        bytes_cost=cost if budget.kind == "bytes" else matrix(Budget("bytes", 1.0)),
        latency_cost=matrix(Budget("latency", 1.0)) if latency is not None else None,
        blocks=np.array([min(inventory[n].block for n in unit) for unit in units]),
    )  # fmt: skip


def _frozen(array: np.ndarray | None) -> np.ndarray | None:
    """A read-only copy (a searcher cannot change the problem another searcher sees)."""
    if array is None:
        return None
    out = np.array(array, copy=True)
    out.flags.writeable = False
    return out


def parse_budgets(text: str) -> list[Budget]:
    """Comma-separated budgets held at once, e.g. ``"sparsity=0.5,bytes=6e7"`` (the first is primary)."""
    budgets = [Budget.parse(part) for part in text.split(",") if part.strip()]
    if not budgets:
        raise AllocatorError(f"no budget in {text!r}: write e.g. --target sparsity=0.5")
    kinds = [b.kind for b in budgets]
    twice = sorted({k for k in kinds if kinds.count(k) > 1})
    if twice:
        raise AllocatorError(f"--target {text!r} names {', '.join(twice)} twice: give each budget kind once")
    return budgets
