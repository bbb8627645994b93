"""Quality of a (compressed) model: perplexity and KL divergence to the dense model."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


def _batches(seqs: torch.Tensor, batch_size: int, desc: str):
    starts = range(0, len(seqs), batch_size)
    for i in tqdm(starts, desc=desc, leave=False, disable=len(starts) < 2):
        yield seqs[i : i + batch_size]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def perplexity(model: nn.Module, seqs: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> float:
    """exp(mean next-token NLL) over every predicted token of ``seqs`` ([n, seq_len])."""
    device = _device(model)
    nll, count = 0.0, 0
    for batch in _batches(seqs, batch_size, desc):
        batch = batch.to(device)
        logits = model(batch).logits[:, :-1].float()  # [b, T-1, V]
        nll += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


BOOTSTRAP_SEED = 0


def bootstrap_mean(values: np.ndarray, samples: int = 1000, level: float = 0.95) -> tuple[float, float, float]:
    """The mean of ``values`` (per window, per task item) and its percentile bootstrap interval, seeded: the same
    values give the same interval."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    means = values[rng.integers(len(values), size=(samples, len(values)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(values.mean()), float(lo), float(hi)


def paired_ratio(nll, base, samples: int = 1000, level: float = 0.95) -> tuple[float, float, float]:
    """Perplexity ratio of two models scored on the same windows (per-window NLLs ``nll`` and ``base``) and its
    paired bootstrap interval: both resampled with the same windows, so the text's own hard and easy windows cancel
    and the interval is the ratio's, much narrower than two overlapping per-model intervals suggest."""
    diff = np.asarray(nll, dtype=np.float64) - np.asarray(base, dtype=np.float64)
    mean, lo, hi = bootstrap_mean(diff, samples, level)
    return math.exp(mean), math.exp(lo), math.exp(hi)


@torch.no_grad()
def window_nll(model: nn.Module, seqs: torch.Tensor, batch_size: int = 4, desc: str = "perplexity") -> np.ndarray:
    """Mean next-token NLL of each window ``[n]`` (float64): what a bootstrap over windows resamples (equal-length
    windows: the perplexity is ``exp`` of their mean)."""
    device = _device(model)
    out = []
    for batch in _batches(seqs, batch_size, desc):
        batch = batch.to(device)
        logits = model(batch).logits[:, :-1].float()
        # flattened [b*(T-1), V] rows: on a CPU the [b, V, T-1] form's log-softmax strays ~4e-5 nats from float64
        nll = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="none").view(len(batch), -1)
        out.append(nll.double().mean(dim=1).cpu().numpy())
    return np.concatenate(out)


@torch.no_grad()
def log_probs(model: nn.Module, seqs: torch.Tensor, batch_size: int = 4, desc: str = "dense log-probs",
              keep: torch.device | str = "cpu") -> torch.Tensor:  # fmt: skip
    """Next-token log-probabilities ``[n, seq_len, V]`` in float32 on ``keep`` (the KL teacher), written in place:
    an 8B model's teacher of 64 windows is 17 GB, and batches joined at the end held it twice on the host."""
    device, out = _device(model), None
    for i, batch in zip(range(0, len(seqs), batch_size), _batches(seqs, batch_size, desc), strict=True):
        found = F.log_softmax(model(batch.to(device)).logits.float(), dim=-1)
        if out is None:
            out = torch.empty((len(seqs), *found.shape[1:]), dtype=found.dtype, device=keep)
        out[i : i + len(found)] = found
    return out


_EXP_SAFE = 20.0  # above this log-ratio, expm1 would overflow float32 where the teacher's mass underflows
_CHUNK = 1024  # token rows per KL chunk: a few [rows, V] float32 temporaries at a time


def kl_sum(teacher: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Σ over tokens of KL(teacher ‖ softmax(logits)), a float64 scalar that is ≥ 0 by construction.

    Written as Σ_v p_v (r_v − 1 − log r_v) with r = q/p (equal to Σ p log p/q because Σ q = Σ p = 1):
    every term is non-negative, and with expm1 a term near r = 1 keeps its relative precision, so a
    layer that barely moves the output gives a tiny positive KL instead of float32 noise of either sign.
    Only the last rounding of each term is clamped; sums run in float64. On a GPU the chunk is one
    compiled kernel chain (eager, it cost as much as the model's forward on a 128k vocabulary).
    """
    teacher, logits = teacher.flatten(0, -2), logits.flatten(0, -2)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    chunk = _kl_chunk_for(logits.device)
    for i in range(0, len(logits), _CHUNK):
        total += chunk(teacher[i : i + _CHUNK].to(logits.device), logits[i : i + _CHUNK])
    return total


def _kl_chunk(p_log: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    p_log = p_log.float()
    q_log = F.log_softmax(logits.float(), dim=-1)
    d = torch.nan_to_num(q_log - p_log, nan=0.0)  # log r; both -inf (no mass either side) contributes 0
    p = p_log.exp()
    near = torch.expm1(d.clamp(max=_EXP_SAFE)) - d.clamp(max=_EXP_SAFE)
    far = q_log.exp() - p - torch.where(p > 0, p * d, 0.0)  # q − p − p·log r without p·e^d overflowing
    term = torch.where(d > _EXP_SAFE, far, p * near)
    return term.clamp_min(0).sum(dtype=torch.float64)


_COMPILED: dict[str, object] = {}


def _kl_chunk_for(device: torch.device):
    """The compiled chunk on CUDA (once per process; eager if compiling is unavailable), else eager."""
    if device.type != "cuda":
        return _kl_chunk
    if "cuda" not in _COMPILED:
        compiled = torch.compile(_kl_chunk, dynamic=True)

        def guarded(p_log: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            try:
                return compiled(p_log, logits)
            except Exception as exc:  # no triton / compiler: the same formula, eager
                log.warning("KL chunk not compiled (%s): running it eagerly", exc)
                _COMPILED["cuda"] = _kl_chunk
                return _kl_chunk(p_log, logits)

        _COMPILED["cuda"] = guarded
    return _COMPILED["cuda"]


@torch.no_grad()
def kl_divergence(
    model: nn.Module, seqs: torch.Tensor, teacher: torch.Tensor, batch_size: int = 4, desc: str = "KL to dense"
) -> float:
    """Mean per-token KL(teacher ‖ model) of next-token distributions (EvoPress's fitness)."""
    device = _device(model)
    total, count = 0.0, 0
    for i, batch in enumerate(_batches(seqs, batch_size, desc)):
        logits = model(batch.to(device)).logits  # [b, T, V]
        total += kl_sum(teacher[i * batch_size : i * batch_size + len(batch)], logits).item()
        count += batch.numel()
    return total / count
