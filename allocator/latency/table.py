"""Latency lookup tables (ZipLM/SPDY-style) and the end-to-end prediction of a plan.

A table holds, for one model on one GPU, the median time of every distinct layer shape x kernel x
token count, and the model's measured *non-linear overhead* at each token count (attention, norms,
embeddings, LM head: the end-to-end dense time minus its linear layers). A plan's predicted
latency is that overhead plus one lookup per layer. Token counts between measured ones are
interpolated linearly in log(tokens) / log(time), which is exact for power laws and close for the
piecewise-linear shape GEMM times have; outside the measured range the table refuses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from allocator.errors import AllocatorError
from allocator.inventory import Inventory, Layer
from allocator.io import write_json_atomic, write_text_atomic
from allocator.latency.kernels import kernel_for
from allocator.levels import Level

COLUMNS = ["kind", "rows", "cols", "kernel", "tokens", "ms", "runs", "serving", "gpu", "driver", "torch"]
MIN_MS = 1e-6  # floor of a time in the table: a noisy negative overhead must not break the log-log interpolation


def slug(text: str) -> str:
    """A folder-safe name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-")


@dataclass
class LatencyTable:
    """Rows of ``COLUMNS`` (kind ``linear`` or ``overhead``) plus where and how they were measured."""

    df: pd.DataFrame
    meta: dict = field(default_factory=dict)
    source: str = "latency table"

    # ---- files ------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        """CSV (the data, GPU/driver/torch on every row) and a JSON sidecar (the settings)."""
        path = Path(path)
        write_text_atomic(path, self.df[COLUMNS].to_csv(index=False))
        write_json_atomic(path.with_suffix(".json"), self.meta)

    @classmethod
    def load(cls, path: str | Path) -> LatencyTable:
        """Read a table written by :meth:`save`, refusing one that lacks a needed column."""
        path = Path(path)
        if not path.is_file():
            raise AllocatorError(
                f"latency table {str(path)!r} does not exist: measure one with `allocator latency measure --model M`"
            )
        try:
            df = pd.read_csv(path)
        except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
            raise AllocatorError(f"latency table {str(path)!r} is not a readable CSV ({exc}): re-measure it") from None
        missing = sorted(set(COLUMNS) - set(df.columns))
        if missing:
            raise AllocatorError(f"latency table {str(path)!r} lacks columns {missing}: re-measure it")
        numbers = {c: pd.to_numeric(df[c], errors="coerce") for c in ("rows", "cols", "tokens", "ms")}
        bad = [c for c, v in numbers.items() if v.isna().any()]
        if bad:
            raise AllocatorError(
                f"latency table {str(path)!r} has a value that is not a number in {bad}: re-measure it"
            )
        if (numbers["ms"] < 0).any() or (numbers["tokens"] < 1).any():
            raise AllocatorError(f"latency table {str(path)!r} has negative times or token counts < 1: re-measure it")
        if not all(np.isfinite(v).all() for v in numbers.values()):
            raise AllocatorError(f"latency table {str(path)!r} has an infinite number: re-measure it")
        df = df.assign(**numbers)
        key = ["kind", "rows", "cols", "kernel", "tokens"]
        twice = df[df.duplicated(key, keep=False)].groupby(key)["ms"].nunique()
        if (twice > 1).any():  # two times for one measurement: which one a budget uses would be arbitrary
            first = ", ".join(map(str, twice[twice > 1].index[0]))
            raise AllocatorError(f"latency table {str(path)!r} holds {int((twice > 1).sum())} measurements twice with "
                                 f"different times (first: {first}): re-measure it")  # fmt: skip
        side = path.with_suffix(".json")
        try:
            meta = json.loads(side.read_text(encoding="utf-8")) if side.is_file() else {}
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise AllocatorError(f"latency table sidecar {str(side)!r} is not valid JSON ({exc}): re-measure") from None
        if not isinstance(meta, dict):
            raise AllocatorError(f"latency table sidecar {str(side)!r} is not a JSON object: re-measure the table")
        return cls(df, meta, str(path))

    # ---- lookups ----------------------------------------------------------------------------
    @cached_property
    def _curves(self) -> dict[tuple, tuple[np.ndarray, np.ndarray, bool]]:
        """(kind, rows, cols, kernel) -> (log tokens, log ms, runs) sorted by tokens."""
        out = {}
        for key, g in self.df.groupby(["kind", "rows", "cols", "kernel"], sort=False):
            g = g.sort_values("tokens")
            out[(key[0], int(key[1]), int(key[2]), key[3])] = (
                np.log(g["tokens"].to_numpy(float)), np.log(np.maximum(g["ms"].to_numpy(float), MIN_MS)),
                bool(g["runs"].all()),
            )  # fmt: skip
        return out

    def _interp(self, key: tuple, tokens: int, what: str) -> float:
        if key not in self._curves:
            raise AllocatorError(
                f"{what} is not in {self.source} (measured shapes: {self.shapes()}): measure it on the target "
                "GPU with `allocator latency measure --model MODEL`"
            )
        x, y, _ = self._curves[key]
        lx = np.log(tokens)
        if not x[0] - 1e-9 <= lx <= x[-1] + 1e-9:
            lo, hi = int(round(np.exp(x[0]))), int(round(np.exp(x[-1])))
            raise AllocatorError(
                f"{tokens} tokens is outside the measured range {lo}..{hi} of {self.source}: "
                "re-measure with `allocator latency measure --tokens ...` covering it"
            )
        return float(np.exp(np.interp(lx, x, y)))

    def shapes(self) -> list[str]:
        """The measured layer shapes, as ``ROWSxCOLS``."""
        lin = self.df[self.df.kind == "linear"]
        return sorted({f"{r}x{c}" for r, c in zip(lin.rows, lin.cols, strict=True)})

    def kernel(self, level: Level, rows: int, cols: int) -> str:
        """The kernel a level runs on at this shape: its own, or dense where that did not run here."""
        name = kernel_for(level, self.meta.get("sparse24", "cusparselt"))
        if name in ("dense", "drop"):
            return name
        curve = self._curves.get(("linear", rows, cols, name))
        return name if curve is not None and curve[2] else "dense"

    def linear_ms(self, rows: int, cols: int, level: Level, tokens: int) -> float:
        """Time of one ``rows x cols`` layer at ``level`` on ``tokens`` tokens (ms)."""
        name = self.kernel(level, rows, cols)
        if name == "drop":
            return 0.0
        return self._interp(("linear", rows, cols, name), tokens, f"layer shape {rows}x{cols} ({name})")

    def layer_ms(self, layer: Layer, level: Level, tokens: int) -> float:
        """Expected time of one layer of the model when the model runs ``tokens`` tokens (ms).

        A routed expert (share p = top_k / experts) is idle with probability (1 - p)^tokens; when active it
        computes on the tokens routed to it: p * tokens in mean, given that it runs at least one.
        """
        if layer.share >= 1:
            return self.linear_ms(layer.rows, layer.cols, level, tokens)
        active = 1 - (1 - layer.share) ** tokens
        return active * self.linear_ms(layer.rows, layer.cols, level, expert_tokens(layer.share, tokens))

    def overhead_ms(self, tokens: int) -> float:
        """The model's measured non-linear time at ``tokens`` tokens (ms)."""
        return self._interp(("overhead", 0, 0, "non-linear"), tokens, "the model's non-linear overhead")

    def predict(self, assignment: dict[str, Level], inventory: Inventory, tokens: int) -> dict[str, float]:
        """Predicted end-to-end time of a plan, its dense time and the speed-up (ms)."""
        linear = sum(self.layer_ms(lay, assignment[lay.name], tokens) for lay in inventory.layers)
        dense = self.dense_ms(inventory, tokens)
        total = self.overhead_ms(tokens) + linear
        return {"tokens": tokens, "predicted_ms": total, "linear_ms": linear, "dense_ms": dense,
                "speedup": dense / total}  # fmt: skip

    def dense_ms(self, inventory: Inventory, tokens: int) -> float:
        """Predicted end-to-end time of the uncompressed model (ms)."""
        dense = Level()
        return self.overhead_ms(tokens) + sum(self.layer_ms(lay, dense, tokens) for lay in inventory.layers)


def expert_tokens(share: float, tokens: int) -> int:
    """Tokens a routed expert computes on when it runs at all (>= 1): what its table row is looked up at."""
    active = 1 - (1 - share) ** tokens
    return max(1, round(share * tokens / active))


def table_tokens(inventory: Inventory, tokens: tuple[int, ...]) -> tuple[int, ...]:
    """The token counts a table must hold for ``tokens``: each, plus what the model's routed experts see."""
    shares = {lay.share for lay in inventory.layers if lay.share < 1}
    return tuple(sorted({*tokens, *(expert_tokens(p, m) for p in shares for m in tokens)}))


@dataclass(frozen=True)
class LatencyModel:
    """A table and the token count a latency budget is stated at: what ``build_problem`` needs."""

    table: LatencyTable
    tokens: int
