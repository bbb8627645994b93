"""Gradient-weighted output error: how much a layer's output error moves the model's KL to itself.

For a small change Δy of a layer's output, KL(dense ‖ perturbed) ≈ ½ Δyᵀ F Δy with F the Fisher of the
model's own next-token distributions with respect to that output. F is estimated from gradients of the
log-likelihood of labels *sampled from the dense model* (so E[g gᵀ] = F, not the empirical Fisher of
the text), kept diagonal per output row and factored from the inputs:

    KL per token ≈ ½ Σ_i f_i · (ΔW Σ ΔWᵀ)_ii,   f_i = mean over tokens of g_i²,   Σ = E[x xᵀ] = H / 2.

Unlike the relative error ‖ΔW X‖² / ‖W X‖², this is in nats of the model's output for every layer, so
summing it over layers means something (an OBD-style second-order estimate of the total KL).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from allocator.inventory import Inventory


def output_fisher(
    model: nn.Module, inventory: Inventory, seqs: torch.Tensor, batch_size: int = 4, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Per layer, ``f_i``: the mean squared gradient of the sampled-label log-likelihood at output row i."""
    device = next(model.parameters()).device
    sums = {name: torch.zeros(inventory[name].rows, dtype=torch.float64, device=device) for name in inventory.shapes}
    gen = torch.Generator(device=device).manual_seed(seed)
    handles = []

    def keep(name: str):
        def on_grad(g: torch.Tensor) -> None:  # returns None: the gradient itself is left as it is
            sums[name].add_(g.detach().float().pow(2).flatten(0, -2).sum(0).double())

        return lambda _m, _i, out: out.register_hook(on_grad) and None

    for name in inventory.shapes:
        handles.append(model.get_submodule(name).register_forward_hook(keep(name)))
    # weights stay frozen; gradients flow from the embeddings' output only (no weight gradients kept)
    handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_(True)))
    flags = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)
    tokens = 0
    try:
        starts = range(0, len(seqs), batch_size)
        for i in tqdm(starts, desc="fisher", leave=False, disable=len(starts) < 2):
            batch = seqs[i : i + batch_size].to(device)
            with torch.enable_grad():
                logits = model(batch, use_cache=False).logits.float()
                with torch.no_grad():
                    labels = sample_labels(logits.flatten(0, 1), gen)
                F.cross_entropy(logits.flatten(0, 1), labels, reduction="sum").backward()
            tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return {name: (s / max(tokens, 1)).float() for name, s in sums.items()}


def sample_labels(logits: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One label per row of ``logits`` ([N, V]) drawn from its softmax by inverting the cumulative distribution at a
    uniform draw: exact sampling as ``torch.multinomial``, which on a CPU took 2 s a batch at a 49k vocabulary."""
    cdf = logits.float().softmax(-1).cumsum(-1)  # [N, V]
    u = torch.rand(len(cdf), 1, generator=gen, device=cdf.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u).clamp_max(cdf.shape[-1] - 1).squeeze(-1)


def row_energy(D: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """(D H Dᵀ)_ii per output row in float64: the squared output error of weight error ``D`` row by row, which
    both the relative error (its sum) and the Fisher-weighted one (its f-weighted sum) need — one product, not two."""
    return ((D @ H) * D).double().sum(1)


def fisher_error(energy: torch.Tensor, f: torch.Tensor) -> float:
    """½ Σ_i f_i (D Σ Dᵀ)_ii with Σ = H/2: the predicted per-token KL of a weight error whose
    :func:`row_energy` is ``energy``."""
    return 0.25 * float((f.to(energy.device).double() * energy).sum())
