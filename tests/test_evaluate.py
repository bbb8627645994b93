from __future__ import annotations

import math

import torch

from allocator.backends import apply_
from allocator.evaluate import kl_divergence, kl_sum, log_probs, perplexity
from allocator.inventory import Inventory
from allocator.levels import parse_level
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
    assert 0.0 <= kl_divergence(model, seqs, teacher, batch_size=3) < 1e-9  # never negative, whatever the batching
    inv = Inventory.from_model(model)
    apply_(model, {lay.name: parse_level("s0.6") for lay in inv.layers}, "magnitude")
    with torch.no_grad():
        q = torch.log_softmax(model(seqs).logits.double(), -1)
    p = teacher.double()
    ref = (p.exp() * (p - q)).sum(-1).mean().item()
    got = kl_divergence(model, seqs, teacher, batch_size=2)
    assert ref > 1e-4 and math.isclose(got, ref, rel_tol=1e-4)


def test_kl_sum_is_nonnegative_and_matches_float64_from_tiny_to_extreme_shifts():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 300, generator=gen) * 4
    eps = torch.finfo(torch.float32).eps
    for scale in (0.0, 1e-6, 1e-4, 1e-2, 1.0, 30.0):
        logits = base + scale * torch.randn(64, 300, generator=gen)
        teacher = torch.log_softmax(base, -1)
        p, q = teacher.double(), torch.log_softmax(logits.double(), -1)
        ref = float((p.exp() * (p - q)).sum())
        got = float(kl_sum(teacher, logits))
        assert got >= 0
        # float32 log-ratios are off by ~eps·|logit|: the KL moves by at most √(2·KL·n)·η + n·η²
        eta, n = 64 * eps * float(base.abs().max()), logits.shape[0]
        assert abs(got - ref) <= (2 * ref * n) ** 0.5 * eta + n * eta**2 + 1e-12 * ref, (scale, got, ref)
    # a teacher with no mass on some tokens (log p = -inf) and a student that puts mass there: finite, no NaN
    teacher = torch.log_softmax(torch.tensor([[0.0, 0.0, -float("inf")]]), -1)
    logits = torch.tensor([[0.0, 0.0, 100.0]])
    q = torch.softmax(logits.double(), -1)
    ref = float(sum(0.5 * math.log(0.5 / q[0, i]) for i in range(2)))
    assert math.isclose(float(kl_sum(teacher, logits)), ref, rel_tol=1e-5)


def test_window_nll_matches_float64_at_a_real_vocabulary_size():
    """Per-window NLLs over a 49,152-way softmax (SmolLM2's) equal float64's to float32 accuracy: a [b, V, T]
    cross-entropy strayed ~4e-5 nats on a CPU, 1e-4 in perplexity, more than a loaded checkpoint may differ."""
    from types import SimpleNamespace

    import numpy as np

    from allocator.evaluate import window_nll

    class Table(torch.nn.Module):  # logits looked up per input token: a model in one embedding
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(64, 49152)
            torch.nn.init.normal_(self.emb.weight, std=4.0, generator=torch.Generator().manual_seed(0))

        def forward(self, ids):
            return SimpleNamespace(logits=self.emb(ids))

    model, seqs = Table(), torch.randint(64, (6, 65), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lp = torch.log_softmax(model(seqs).logits[:, :-1].double(), -1)
    ref = -lp.gather(-1, seqs[:, 1:, None]).squeeze(-1).mean(1).numpy()
    nll = window_nll(model, seqs, 4)
    assert np.allclose(nll, ref, rtol=4 * torch.finfo(torch.float32).eps * 8, atol=0)
    assert math.isclose(math.exp(nll.mean()), perplexity(model, seqs, 4), rel_tol=1e-6)


def test_log_probs_are_the_float64_reference_whatever_the_batching():
    """The teacher is written in place batch by batch (a last batch shorter than the others included)."""
    model, seqs = tiny_model("llama"), _seqs()
    with torch.no_grad():
        ref = torch.log_softmax(model(seqs).logits.double(), -1)
    tol = 8 * torch.finfo(torch.float32).eps * ref.abs().max().item()
    for batch_size in (1, 2, 3, 5):
        got = log_probs(model, seqs, batch_size)
        assert got.shape == ref.shape and got.dtype == torch.float32 and got.device.type == "cpu"
        assert (got.double() - ref).abs().max().item() < tol, batch_size
