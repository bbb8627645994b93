"""The Plan: one level per layer under a budget, the currency every part of allocator exchanges.

Saved as versioned JSON. Schema 2 is self-contained: besides the levels it records the backend and its
settings, the deployment format and the data that made the plan, so ``allocator apply plan.json`` needs
nothing beside it (schema-1 plans still load; their settings come from the ``config.json`` beside them).
Loading checks the schema, and ``check_against`` refuses a plan made for another model (fingerprint), one
naming unknown layers or levels outside its grid.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from allocator.budget import LATENCY_KINDS, Budget, achieved, ceiling
from allocator.errors import AllocatorError
from allocator.formats import check_level, unfit
from allocator.inventory import Inventory, Layer
from allocator.io import write_json_atomic
from allocator.levels import Level, parse_level
from allocator.untrusted import check_count, check_names, check_text, check_tree

if TYPE_CHECKING:
    from allocator.latency.table import LatencyModel

SCHEMA_VERSION = 2
READABLE = (1, 2)  # schema 1: no backend or data sources (they are in the run folder's config.json)


@dataclass
class Plan:
    """One level per layer, with what made it: model fingerprint, budget, grid, method, seed, timings."""

    assignment: dict[str, Level]
    model_id: str
    fingerprint: str
    shapes: dict[str, list[int]]
    budget: Budget
    grid: list[Level]
    method: str
    seed: int
    per: str = "layer"
    extra_budgets: list[Budget] = field(default_factory=list)
    achieved: dict[str, float] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # the calibration windows that made it (source, sizes, BOS)
    shares: dict[str, float] = field(default_factory=dict)  # routed experts' token shares (latency prices them)
    attention: list[str] = field(default_factory=list)  # per block: full or sliding:<window>
    layers: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (decoder block, role)
    backend: dict = field(default_factory=dict)  # name, batch_size, dtype, device: how to reproduce the weights
    schema: int = SCHEMA_VERSION
    source: str = field(default="plan", repr=False, compare=False)  # where it was read from, for error lines

    def __post_init__(self) -> None:
        """Every plan, built or read, holds module names, one-line texts and finite numbers: exporters write them
        into regexes, YAML, CSV and shell scripts that other tools run."""
        src = self.source
        check_names(self.assignment, src)
        check_names(self.shapes, src, "layer names in model.shapes")
        check_names(self.layers, src, "layer names in model.layers")
        check_names(self.shares, src, "layer names in model.expert_shares")
        for name, value in (("model.id", self.model_id), ("model.fingerprint", self.fingerprint),
                            ("method", self.method), ("per", self.per)):  # fmt: skip
            check_text(value, name, src)
        for what, names in (("model.shapes", self.shapes), ("model.layers", self.layers or self.shapes),
                            ("model.expert_shares", {**self.shapes, **self.shares})):  # fmt: skip
            if set(names) != set(self.assignment):
                odd = sorted(set(names) ^ set(self.assignment))
                raise AllocatorError(f"{src}: the layers of assignment and {what} differ ({_some(odd)}): re-create it")
        for name, shape in self.shapes.items():
            if not isinstance(shape, list | tuple) or len(shape) != 2:
                raise AllocatorError(f"{src}: model.shapes[{name}] must be [rows, cols], got {repr(shape)[:80]}")
            for dim in shape:
                check_count(dim, f"model.shapes[{name}]", src, 1, 2**31)
        for name, (block, role) in self.layers.items():
            check_count(block, f"model.layers[{name}] block", src, -1, 2**20)
            check_text(role, f"model.layers[{name}] role", src)
        check_count(self.seed, "seed", src, -(2**63), 2**64)
        for name in ("achieved", "timings", "data", "shares", "attention", "backend"):
            check_tree(getattr(self, name), name, src)

    @classmethod
    def create(
        cls,
        assignment: dict[str, Level],
        inventory: Inventory,
        model_id: str,
        budget: Budget,
        grid: list[Level],
        method: str,
        seed: int,
        per: str = "layer",
        timings: dict[str, float] | None = None,
        extra_budgets: list[Budget] | None = None,
        data: dict | None = None,
        backend: dict | None = None,
    ) -> Plan:
        """Build a plan and record what it achieves exactly."""
        plan = cls(
            assignment=dict(assignment),
            model_id=model_id,
            fingerprint=inventory.fingerprint,
            shapes=inventory.shapes,
            budget=budget,
            grid=list(grid),
            method=method,
            seed=seed,
            per=per,
            extra_budgets=list(extra_budgets or []),
            achieved=achieved(assignment, inventory),
            timings=dict(timings or {}),
            data=dict(data or {}),
            shares={lay.name: lay.share for lay in inventory.layers if lay.share < 1},
            attention=list(inventory.attention),
            layers={lay.name: (lay.block, lay.role) for lay in inventory.layers},
            backend=dict(backend or {}),
        )
        plan.check_against(inventory)
        return plan

    @property
    def format(self) -> str:
        """The deployment format its levels were made for (``--format``): one name, ``any`` or ``mixed``."""
        made = {lv.format for lv in self.assignment.values() if lv.format}
        return made.pop() if len(made) == 1 else ("mixed" if made else "any")

    def to_dict(self) -> dict:
        """The JSON form (level names as strings)."""
        return {
            "schema_version": self.schema,
            "format": self.format,
            "backend": self.backend,
            "model": {
                "id": self.model_id,
                "fingerprint": self.fingerprint,
                "shapes": self.shapes,
                "expert_shares": self.shares,
                "attention": self.attention,
                "layers": {name: list(where) for name, where in self.layers.items()},
            },  # fmt: skip
            "budget": asdict(self.budget),
            "extra_budgets": [asdict(b) for b in self.extra_budgets],
            "grid": [lv.name for lv in self.grid],
            "method": self.method,
            "seed": self.seed,
            "per": self.per,
            "achieved": self.achieved,
            "timings": self.timings,
            "data": self.data,
            "assignment": {name: lv.name for name, lv in self.assignment.items()},
        }

    def save(self, path: str | Path) -> None:
        """Write the plan as JSON atomically."""
        write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path, inventory: Inventory | None = None) -> Plan:
        """Read and validate a plan file; with ``inventory``, also check it fits that model."""
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AllocatorError(f"plan file {str(path)!r} does not exist: pass a plan.json from allocator") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AllocatorError(f"plan file {str(path)!r} is not valid JSON ({exc}): re-create it") from None
        plan = cls.from_dict(data, source=str(path))
        if inventory is not None:
            plan.check_against(inventory)
        return plan

    @classmethod
    def from_dict(cls, data: object, source: str = "plan") -> Plan:
        """Validate the JSON form and build a Plan."""
        version = data.get("schema_version") if isinstance(data, dict) else None
        if version not in READABLE:
            raise AllocatorError(
                f"{source}: not an allocator plan of schema_version {' or '.join(map(str, READABLE))} (found "
                f"{version!r}): re-create it with this version of allocator"
            )
        try:
            model, budget = data["model"], data["budget"]
            grid = [parse_level(name) for name in data["grid"]]
            plan = cls(
                assignment={name: parse_level(lv) for name, lv in data["assignment"].items()},
                model_id=str(model["id"]),
                fingerprint=str(model["fingerprint"]),
                shapes={k: list(v) if isinstance(v, list) else v for k, v in model["shapes"].items()},
                budget=Budget(str(budget["kind"]), float(budget["value"])).checked(),
                grid=grid,
                method=str(data["method"]),
                seed=data["seed"],
                per=str(data.get("per", "layer")),
                extra_budgets=[
                    Budget(str(b["kind"]), float(b["value"])).checked() for b in data.get("extra_budgets", [])
                ],
                achieved=dict(data.get("achieved", {})),
                timings=dict(data.get("timings", {})),
                data=dict(data.get("data", {})),
                shares={k: float(v) for k, v in model.get("expert_shares", {}).items()},
                attention=[str(a) for a in model.get("attention", [])],
                layers={k: (b, r) for k, (b, r) in model.get("layers", {}).items()}
                or {name: _block_and_role(name) for name in model["shapes"]},
                backend=dict(data.get("backend", {})),
                schema=int(version),
                source=source,
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise AllocatorError(f"{source}: malformed plan ({type(exc).__name__}: {exc}): re-create it") from None
        for level in grid:  # a tagged level its format does not store (a hand-edited plan) is refused here
            check_level(level)
        off_grid = sorted({lv.name for lv in plan.assignment.values()} - {lv.name for lv in grid})
        if off_grid:
            raise AllocatorError(f"{source}: levels {off_grid} are outside the plan's grid {[lv.name for lv in grid]}")
        return plan

    def over_budget(self, latency: LatencyModel | None = None) -> list[str]:
        """The budgets this plan breaks, each with its numbers (a latency budget only with a table)."""
        layers = tuple(
            Layer(name, 0, "", rows, cols, self.shares.get(name, 1.0)) for name, (rows, cols) in self.shapes.items()
        )
        inventory = Inventory(layers, (), "", 0)
        broken = []
        for budget in (self.budget, *self.extra_budgets):
            if budget.kind in LATENCY_KINDS and latency is None:
                continue
            total = sum(budget.cost(self.assignment[lay.name], lay, latency) for lay in layers)
            limit = budget.limit(inventory, latency)
            if total > ceiling(limit):
                reached = achieved(self.assignment, inventory).get(budget.kind)
                shown = f"achieves {budget.kind} {reached:.6g}" if reached is not None else f"costs {total:.6g}"
                broken.append(f"{budget}: {shown} (total {total:.6g} > limit {limit:.6g})")
        return broken

    def check_budget(self, source: str, allow: bool = False, latency: LatencyModel | None = None) -> list[str]:
        """Refuse a plan that breaks its budget unless ``allow``; return what it breaks (for the metrics)."""
        broken = self.over_budget(latency)
        if broken and not allow:
            raise AllocatorError(
                f"{source} breaks its budget {'; '.join(broken)}: re-plan it, or pass --allow-over-budget"
            )
        return broken

    def check_against(self, inventory: Inventory) -> None:
        """Raise unless this plan was made for ``inventory``'s model and names each of its layers once."""
        names = {lay.name for lay in inventory.layers}
        unknown = sorted(set(self.assignment) - names)
        if unknown:
            raise AllocatorError(f"plan names layers this model does not have: {_some(unknown)}")
        missing = sorted(names - set(self.assignment))
        if missing:
            raise AllocatorError(f"plan gives no level to layers {_some(missing)}")
        if self.fingerprint != inventory.fingerprint:
            raise AllocatorError(
                f"plan was made for another model (fingerprint {self.fingerprint}, this model has "
                f"{inventory.fingerprint}): use the plan with the model it was made for ({self.model_id})"
            )
        grid = {lv.name for lv in self.grid}
        off = sorted({f"{n}={lv.name}" for n, lv in self.assignment.items() if lv.name not in grid})
        if off:
            raise AllocatorError(f"plan levels outside its grid: {_some(off)}")
        bad = [f"{n}: {why}" for n, lv in self.assignment.items() if (why := unfit(lv, *self.shapes[n]))]
        if bad:
            raise AllocatorError(f"plan levels that cannot apply: {_some(bad)}")


def _block_and_role(name: str) -> tuple[int, str]:
    """A layer's block and role from its name: plans written before they were recorded (``lm_head``: -1)."""
    match = re.search(r"\.(\d+)\.(.+)$", name)
    return (int(match.group(1)), match.group(2)) if match else (-1, name.rsplit(".", 1)[-1])


def _some(items: list[str], n: int = 5) -> str:
    """The first ``n`` items and how many more: errors name offenders without flooding the line."""
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return f"{items[:n]}{more}"
