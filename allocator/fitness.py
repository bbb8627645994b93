"""Fitness of a candidate plan on the real model: KL to the dense model, evaluated incrementally.

Candidates are set from the level database, resident on the model's device (a decode per changed
layer). The parent's inputs to every decoder block are cached for the whole calibration pool; a
candidate that differs from its parent only from block i onward starts at block i from that cache, so
blocks before i are not run. ``counters`` reports the share of block-forwards this saves. The model
runs in its own dtype, log-softmax and KL in float32 with float64 sums, all on the device: the host
waits once per set of candidates scored together (:meth:`KLFitness.scores`), not per batch.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from allocator.backends.database import LevelDatabase
from allocator.budget import Problem
from allocator.evaluate import kl_sum, log_probs
from allocator.inventory import Inventory


class KLFitness:
    """Mean per-token KL(dense ‖ candidate) on chosen sequences of a fixed calibration pool."""

    def __init__(
        self,
        model: nn.Module,
        inventory: Inventory,
        problem: Problem,
        database: LevelDatabase,
        pool: torch.Tensor,
        batch_size: int = 4,
        incremental: bool = True,
    ) -> None:
        self.model, self.inventory, self.problem, self.db = model, inventory, problem, database
        self.incremental = incremental  # False: every candidate runs every block (the baseline)
        self.device = _device(model)
        database.resident(self.device)  # compact parts on the GPU when they fit (else host + decoded cache)
        self.pool = pool.to(self.device)  # [n, seq_len]
        self.pool_size, self.seq_len = pool.shape
        self.batch_size = batch_size
        self.blocks = model.get_submodule(inventory.blocks)
        self.unit_block = np.array([min(inventory[n].block for n in unit) for unit in problem.units])
        self.current: np.ndarray | None = None  # the choice the model's weights hold now
        self._set(np.full(len(problem.units), -1))  # dense: every layer at the database's dense level
        # kept on the model's device: copying it per candidate was the GPU search's bottleneck
        self.teacher = log_probs(model, pool, batch_size, desc="teacher", keep=self.device)  # [n, T, V]
        self.parent: np.ndarray | None = None
        self.cache: list[torch.Tensor] = []  # per block: its inputs for the whole pool, [n, T, hidden]
        if self.device.type == "cuda":  # warm-up: compiles the KL kernels before any timed search
            self._kl_total(np.arange(min(batch_size, self.pool_size)), 0)
        self.counters = {"block_forwards": 0, "block_forwards_saved": 0}

    # ---- weights ----------------------------------------------------------------------------------
    def _set(self, choice: np.ndarray) -> None:
        """Load the database weights of the units whose level differs from what the model holds (-1: dense)."""
        changed = range(len(choice)) if self.current is None else np.flatnonzero(choice != self.current)
        assignment = {
            name: self.db.levels[0] if choice[u] < 0 else self.problem.levels[choice[u]]
            for u in changed
            for name in self.problem.units[u]
        }
        self.db.load_into_(self.model, assignment)
        self.current = choice.copy()

    # ---- parent cache -----------------------------------------------------------------------------
    @torch.no_grad()
    def set_parent(self, choice: np.ndarray) -> None:
        """Hold ``choice`` in the model and cache every block's inputs for the whole pool."""
        self._set(choice)
        inputs: list[list[torch.Tensor]] = [[] for _ in self.blocks]
        handles = [
            block.register_forward_pre_hook(lambda _m, args, kwargs, b=b: inputs[b].append(_hidden(args, kwargs)),
                                            with_kwargs=True)
            for b, block in enumerate(self.blocks)
        ]  # fmt: skip
        # a skipped block must return what the real one returns (a tensor, or a tuple led by it)
        handles.append(self.blocks[0].register_forward_hook(
            lambda _m, _i, out: setattr(self, "_tuple_out", isinstance(out, tuple))))  # fmt: skip
        try:
            for i in range(0, self.pool_size, self.batch_size):
                self.model(self.pool[i : i + self.batch_size], use_cache=False)
        finally:
            for h in handles:
                h.remove()
        self.cache = [torch.cat(x) for x in inputs]
        self.parent = choice.copy()

    # ---- scoring ----------------------------------------------------------------------------------
    def __call__(self, choice: np.ndarray, batch: np.ndarray) -> float:
        """KL on pool rows ``batch``, running only the blocks from the first one that changed."""
        return self.scores([choice], batch)[0]

    @torch.no_grad()
    def scores(self, choices: list[np.ndarray], batch: np.ndarray) -> list[float]:
        """:meth:`__call__` for each of ``choices`` on the same rows, with one host sync for all of them."""
        totals = []
        for choice in choices:
            diff = np.flatnonzero(choice != self.parent)
            start = int(self.unit_block[diff].min()) if len(diff) else len(self.blocks) - 1
            start = start if self.incremental else 0
            self._set(choice)
            self.counters["block_forwards"] += len(self.blocks) * len(batch)
            self.counters["block_forwards_saved"] += start * len(batch)
            totals.append(self._kl_total(batch, start))
        return (torch.stack(totals) / (len(batch) * self.seq_len)).tolist()

    @torch.no_grad()
    def full(self, choice: np.ndarray, batch: np.ndarray) -> float:
        """The same KL by a full forward pass (the reference the incremental path must match)."""
        self._set(choice)
        return float(self._kl_total(batch, 0)) / (len(batch) * self.seq_len)

    def _kl_total(self, batch: np.ndarray, start: int) -> torch.Tensor:
        """Σ KL over the tokens of pool rows ``batch`` (a float64 scalar on the device: no host sync)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        index = torch.as_tensor(batch, device=self.device)
        for rows in index.split(self.batch_size):
            with self._from_block(start, self.cache[start][rows] if start and self.cache else None):
                logits = self.model(self.pool[rows], use_cache=False).logits
            total += kl_sum(self.teacher[rows], logits)
        return total

    @contextmanager
    def _from_block(self, start: int, hidden: torch.Tensor | None):
        """Skip blocks before ``start`` and feed ``hidden`` (the cached input) to block ``start``."""
        if hidden is None:
            yield
            return
        skipped = list(self.blocks)[:start]
        as_tuple = getattr(self, "_tuple_out", False)
        for block in skipped:
            block.forward = lambda *a, **k: (_hidden(a, k),) if as_tuple else _hidden(a, k)
        handle = self.blocks[start].register_forward_pre_hook(
            lambda _m, args, kwargs: _replace_hidden(args, kwargs, hidden), with_kwargs=True
        )
        try:
            yield
        finally:
            handle.remove()
            for block in skipped:
                del block.forward


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_hidden(args: tuple, kwargs: dict, hidden: torch.Tensor):
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
