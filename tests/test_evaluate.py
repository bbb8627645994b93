from __future__ import annotations

import math

import torch

from allocator.backends import apply_
from allocator.evaluate import kl_divergence, log_probs, perplexity
from allocator.levels import parse_level
from allocator.model import Inventory
from tests.conftest import VOCAB, tiny_model


def _seqs(n=5, t=17, seed=0):
    return torch.randint(VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def test_perplexity_matches_float64_reference():
    model, seqs = tiny_model("llama"), _seqs()
    with torch.no_grad():
        logits = model(seqs).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1)
    nll = -lp.gather(-1, seqs[:, 1:, None]).mean()
    ref = math.exp(nll.item())
    for batch_size in (1, 2, 5):  # batching must not change the answer
        assert math.isclose(perplexity(model, seqs, batch_size), ref, rel_tol=1e-5)


def test_kl_is_zero_to_itself_and_matches_reference_after_pruning():
    model, seqs = tiny_model("qwen3"), _seqs()
    teacher = log_probs(model, seqs, batch_size=2)
    assert abs(kl_divergence(model, seqs, teacher, batch_size=3)) < 1e-6
    inv = Inventory.from_model(model)
    apply_(model, {lay.name: parse_level("s0.6") for lay in inv.layers}, "magnitude")
    with torch.no_grad():
        q = torch.log_softmax(model(seqs).logits.double(), -1)
    p = teacher.double()
    ref = (p.exp() * (p - q)).sum(-1).mean().item()
    got = kl_divergence(model, seqs, teacher, batch_size=2)
    assert ref > 1e-4 and math.isclose(got, ref, rel_tol=1e-4)
