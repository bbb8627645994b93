"""Measure latency tables and whole compressed models on the target device.

On CUDA every timing is the median of many CUDA-event-timed replays of a CUDA graph (launch
overhead out, as in a serving engine), after warm-up. One replay runs the layer over enough
distinct weight copies to exceed the L2 cache, so a layer is timed streaming its weights from
memory as it does inside the model, not L2-hot. On CPU (tests) the same code times with
``perf_counter``.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from allocator.errors import AllocatorError, first_line
from allocator.inventory import Inventory
from allocator.latency.kernels import (
    ALL_KERNELS,
    NO_KERNEL_NOTE,
    SERVING,
    KernelLinear,
    KernelUnavailable,
    build,
)
from allocator.latency.table import COLUMNS, MIN_MS, LatencyTable, table_tokens
from allocator.levels import Level

log = logging.getLogger(__name__)

DECODE_TOKENS = (1, 2, 4, 8, 16)
PREFILL_TOKENS = (512, 1024, 2048, 4096)
_STREAM_BYTES = 256 * 2**20  # weight bytes streamed per decode replay: well above any L2 (H100: 50 MB)
_PREFILL_BYTES = 32 * 2**20  # prefill is compute-bound: fewer copies, enough to time tiny layers
_MAX_COPIES = 256


@dataclass
class Timer:
    """Median time of a function; CUDA graphs and events on GPU, ``perf_counter`` on CPU.

    Repeats adapt to the cost of one call (at least 5, at most ``repeats``, about ``budget_ms`` in
    all), so slow kernels (int8 weight-only at prefill sizes) do not dominate a table's time.
    """

    device: str
    repeats: int = 30
    warmup: int = 2
    graphs: bool = True
    budget_ms: float = 300.0
    used_graph: bool = field(default=False, init=False)
    graph_error: str = field(default="", init=False)

    def __call__(self, fn: Callable[[], object], per_call: int = 1) -> float:
        """Milliseconds of one of the ``per_call`` units of work one ``fn()`` does."""
        if self.device.startswith("cuda"):
            graphed = self._graphed(fn) if self.graphs else None
            self.used_graph = graphed is not None
            run = graphed or fn
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

            def once() -> float:
                start.record()
                run()
                end.record()
                end.synchronize()
                return start.elapsed_time(end)
        else:
            run = fn

            def once() -> float:
                t0 = time.perf_counter()
                fn()
                return (time.perf_counter() - t0) * 1e3

        for _ in range(self.warmup):
            run()
        times: list[float] = []
        while len(times) < self.repeats:
            times.append(once())
            if len(times) >= 5 and sum(times) > self.budget_ms:
                break
        return statistics.median(times) / per_call

    def _graphed(self, fn: Callable[[], object]) -> Callable[[], object] | None:
        """``fn`` captured as a CUDA graph (None where capture fails: timed eagerly instead)."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
        except RuntimeError as exc:
            self.graph_error = first_line(exc, 160)
            log.warning("CUDA graph capture failed (%s): timing eagerly", self.graph_error)
            torch.cuda.synchronize()
            return None
        return graph.replay


def linear_shapes(inventory: Inventory) -> list[tuple[int, int]]:
    """The distinct (rows, cols) of a model's compressible layers, in first-seen order."""
    return list(dict.fromkeys((lay.rows, lay.cols) for lay in inventory.layers))


@torch.no_grad()
def measure_linears(
    shapes: list[tuple[int, int]], tokens: tuple[int, ...], kernels: tuple[str, ...] = ALL_KERNELS,
    device: str = "cuda", dtype: torch.dtype = torch.bfloat16, timer: Timer | None = None,
) -> list[dict]:  # fmt: skip
    """One row per shape x kernel x token count; a kernel that cannot run gets the dense time."""
    timer = timer or Timer(device)
    kernels = ("dense", *(k for k in kernels if k != "dense"))  # dense first: the fallback time of the rest
    rows_out: list[dict] = []
    bar = tqdm(total=len(shapes) * len(kernels) * len(tokens), desc="latency table", leave=False)
    for rows, cols in shapes:

        def copies(m: int, size: int = rows * cols * 2) -> int:
            stream = _STREAM_BYTES if m <= max(DECODE_TOKENS) else _PREFILL_BYTES
            return 1 if device == "cpu" else max(1, min(_MAX_COPIES, math.ceil(stream / size)))

        weights = [torch.randn(rows, cols, device=device, dtype=dtype) * 0.02 for _ in range(copies(min(tokens)))]
        dense: dict[int, float] = {}
        for kernel in kernels:
            try:
                fns = [build(kernel, w) for w in weights]
                runs, note = True, SERVING.get(kernel, "")
            except KernelUnavailable as exc:
                fns, runs, note = None, False, f"no kernel here ({exc}): dense time"
            for m in tokens:
                if fns is None:
                    ms = dense[m]
                else:
                    x = torch.randn(m, cols, device=device, dtype=dtype)
                    n = copies(m)
                    ms = timer(lambda fns=fns[:n], x=x: [f(x) for f in fns], per_call=n)
                if kernel == "dense":
                    dense[m] = ms
                rows_out.append({"kind": "linear", "rows": rows, "cols": cols, "kernel": kernel, "tokens": m,
                                 "ms": ms, "runs": runs, "serving": note})  # fmt: skip
                bar.update()
            del fns
        del weights
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    bar.close()
    return rows_out


@torch.no_grad()
def model_ms(model: nn.Module, tokens: int, timer: Timer) -> float:
    """End-to-end time of one forward over ``tokens`` tokens (one sequence, no KV cache)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), device=device)
    return timer(lambda: model(input_ids=ids, use_cache=False).logits)


def measure_table(
    model: nn.Module, inventory: Inventory, tokens: tuple[int, ...], kernels: tuple[str, ...] = ALL_KERNELS,
    timer: Timer | None = None, env: dict | None = None, meta: dict | None = None,
) -> LatencyTable:  # fmt: skip
    """The table of a model: its layer shapes x kernels x tokens, plus its non-linear overhead.

    The overhead at each token count is the model's measured dense end-to-end time minus the
    table's dense times of its layers, so that a dense plan is predicted exactly and every other
    plan is predicted from measured pieces.
    """
    device = str(next(model.parameters()).device)
    dtype = next(model.parameters()).dtype
    timer = timer or Timer(device)
    rows = measure_linears(linear_shapes(inventory), table_tokens(inventory, tokens), kernels, device, dtype, timer)
    partial = LatencyTable(pd.DataFrame(rows), source="the linear rows")
    for m in tokens:
        total = model_ms(model, m, timer)
        linear = sum(partial.layer_ms(lay, Level(), m) for lay in inventory.layers)
        how = "CUDA graph" if timer.used_graph else f"eager ({timer.graph_error or 'no graphs'})"
        # linears timed one by one can add up to more than the whole model on a busy host: no overhead, not < 0
        rows.append({"kind": "overhead", "rows": 0, "cols": 0, "kernel": "non-linear", "tokens": m,
                     "ms": max(total - linear, MIN_MS), "runs": True,
                     "serving": f"dense {total:.4f} ms, linears {linear:.4f} ms, {how}"})  # fmt: skip
    df = pd.DataFrame(rows)
    for key, value in (env or {}).items():
        df[key] = value
    meta = {**(meta or {}), **(env or {}), "dtype": str(dtype).removeprefix("torch."), "repeats": timer.repeats,
            "cuda_graphs": timer.graphs, "no_kernel": NO_KERNEL_NOTE, "sparse24": "cusparselt"}  # fmt: skip
    return LatencyTable(df[COLUMNS], meta)


def environment(device: str) -> dict[str, str]:
    """GPU name, driver and torch version, stored with every table."""
    if device.startswith("cuda"):
        import subprocess

        name = torch.cuda.get_device_name(device)
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.split()[0]  # fmt: skip
        except (OSError, IndexError, subprocess.SubprocessError):
            driver = "unknown"
    else:
        import platform

        name, driver = f"cpu-{platform.machine()}", "none"
    return {"gpu": name, "driver": driver, "torch": torch.__version__}


class Compressor:
    """Swaps a model's linear layers to the kernels of a plan, caching each (layer, kernel) once."""

    def __init__(self, model: nn.Module, inventory: Inventory, table: LatencyTable) -> None:
        self.model, self.inventory, self.table = model, inventory, table
        self.dense = {lay.name: model.get_submodule(lay.name) for lay in inventory.layers}
        self._cache: dict[tuple[str, str], nn.Module] = {}

    def apply(self, assignment: dict[str, Level]) -> dict[str, int]:
        """Put every layer on its level's kernel (the same choice the table's prediction made)."""
        used: dict[str, int] = {}
        for lay in self.inventory.layers:
            kernel = self.table.kernel(assignment[lay.name], lay.rows, lay.cols)
            if kernel == "drop":
                raise ValueError("dropped layers are not timed end to end: remove 'drop' from the plan")
            self._set(lay.name, self._module(lay.name, kernel))
            used[kernel] = used.get(kernel, 0) + 1
        return used

    def restore(self) -> None:
        """Back to the dense layers."""
        for name, module in self.dense.items():
            self._set(name, module)

    def _module(self, name: str, kernel: str) -> nn.Module:
        if kernel == "dense":
            return self.dense[name]
        if (name, kernel) not in self._cache:
            linear = self.dense[name]
            try:
                fn = build(kernel, linear.weight.detach())
            except KernelUnavailable as exc:  # the table came from another device: its prediction can't be checked
                gpu = self.table.meta.get("gpu", "the table's device")
                raise AllocatorError(f"{name}: the table ran {kernel} on {gpu}, this device cannot ({exc}): "
                                     "run the check on that GPU, or measure a table here") from exc  # fmt: skip
            self._cache[(name, kernel)] = KernelLinear(fn, linear.bias)
        return self._cache[(name, kernel)]

    def _set(self, name: str, module: nn.Module) -> None:
        parent, _, leaf = name.rpartition(".")
        setattr(self.model.get_submodule(parent), leaf, module)


def check_plans(
    model: nn.Module, inventory: Inventory, table: LatencyTable, plans: dict[str, dict[str, Level]],
    tokens: tuple[int, ...], timer: Timer, max_slowdown: float | None = None,
) -> list[dict]:  # fmt: skip
    """Predicted vs measured end-to-end time of each plan at each token count (plus dense).

    A plan predicted slower than ``max_slowdown`` x dense is listed but not run (int8 weight-only
    at prefill sizes takes seconds per forward here).
    """
    compressor = Compressor(model, inventory, table)
    out = []
    with torch.no_grad():
        for m in tokens:
            dense = model_ms(model, m, timer)
            for name, assignment in tqdm(plans.items(), desc=f"check @{m} tokens", leave=False):
                pred = table.predict(assignment, inventory, m)
                if max_slowdown and pred["speedup"] < 1 / max_slowdown:
                    out.append({"plan": name, "tokens": m, "predicted_ms": pred["predicted_ms"],
                                "skipped": f"predicted {1 / pred['speedup']:.1f}x slower than dense"})  # fmt: skip
                    continue
                kernels = compressor.apply(assignment)
                try:
                    measured = model_ms(model, m, timer)
                finally:
                    compressor.restore()
                out.append({"plan": name, "tokens": m, "predicted_ms": pred["predicted_ms"], "measured_ms": measured,
                            "error_pct": 100 * (pred["predicted_ms"] - measured) / measured,
                            "predicted_speedup": pred["speedup"], "measured_speedup": dense / measured,
                            "measured_dense_ms": dense, "graph": timer.used_graph,
                            "kernels": " ".join(f"{k}:{n}" for k, n in sorted(kernels.items()))})  # fmt: skip
            if str(next(model.parameters()).device).startswith("cuda"):
                torch.cuda.empty_cache()
    return out
