"""Quality of a (compressed) model: perplexity and KL divergence to the dense model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


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


@torch.no_grad()
def log_probs(model: nn.Module, seqs: torch.Tensor, batch_size: int = 4, desc: str = "dense log-probs") -> torch.Tensor:
    """Next-token log-probabilities ``[n, seq_len, V]`` in float32 on the CPU (the KL teacher)."""
    device = _device(model)
    out = [F.log_softmax(model(b.to(device)).logits.float(), dim=-1).cpu() for b in _batches(seqs, batch_size, desc)]
    return torch.cat(out)


@torch.no_grad()
def kl_divergence(
    model: nn.Module, seqs: torch.Tensor, teacher: torch.Tensor, batch_size: int = 4, desc: str = "KL to dense"
) -> float:
    """Mean per-token KL(teacher ‖ model) of next-token distributions (EvoPress's fitness)."""
    device = _device(model)
    total, count = 0.0, 0
    for i, batch in enumerate(_batches(seqs, batch_size, desc)):
        student = F.log_softmax(model(batch.to(device)).logits.float(), dim=-1)  # [b, T, V]
        p_log = teacher[i * batch_size : i * batch_size + len(batch)].to(device)
        total += (p_log.exp() * (p_log - student)).sum().item()
        count += batch.numel()
    return total / count
