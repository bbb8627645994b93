"""The cached dense reference equals a fresh one, and is never served for other weights or other data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from allocator.evaluate import log_probs, perplexity, window_nll
from allocator.reference import dense_reference, weights_fingerprint
from tests.conftest import VOCAB, tiny_model

F32 = 64 * torch.finfo(torch.float32).eps  # per-window and summed NLL differ in rounding only


def _seqs(seed: int, n: int = 3, t: int = 12) -> torch.Tensor:
    return torch.randint(VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def test_cached_reference_equals_the_fresh_one(tmp_path):
    model = tiny_model("llama")
    ev, kl = _seqs(0), _seqs(1)
    ppl, teacher, cached, nll = dense_reference(model, ev, kl, 2, tmp_path)
    assert not cached
    assert ppl == pytest.approx(perplexity(model, ev, 2), rel=F32) and torch.equal(teacher, log_probs(model, kl, 2))
    assert np.array_equal(nll, window_nll(model, ev, 2)) and ppl == math.exp(nll.mean())
    ppl2, teacher2, cached2, nll2 = dense_reference(model, ev, kl, 2, tmp_path)
    assert cached2 and ppl2 == ppl and np.array_equal(nll2, nll)
    tol = 16 * torch.finfo(torch.float32).eps * float(teacher.abs().max())
    assert torch.allclose(teacher2, teacher, rtol=0, atol=tol)
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".safetensors"]  # no temporary left


def test_cache_is_refused_for_other_weights_or_data(tmp_path):
    model = tiny_model("llama")
    ev, kl = _seqs(0), _seqs(1)
    dense_reference(model, ev, kl, 2, tmp_path)
    other = tiny_model("llama", seed=1)  # same shapes, other weights
    assert weights_fingerprint(other) != weights_fingerprint(model)
    ppl, teacher, cached, _ = dense_reference(other, ev, kl, 2, tmp_path)
    assert (
        not cached
        and ppl == pytest.approx(perplexity(other, ev, 2), rel=F32)
        and torch.equal(teacher, log_probs(other, kl, 2))
    )
    for ev2, kl2 in ((_seqs(2), kl), (ev, _seqs(3))):  # other evaluation text, other KL windows
        assert not dense_reference(model, ev2, kl2, 2, tmp_path)[2]
    with torch.no_grad():  # one weight changed in place: a different fingerprint
        model.model.layers[0].mlp.down_proj.weight[0, 0] += 1.0
    assert not dense_reference(model, ev, kl, 2, tmp_path)[2]


def test_an_entry_whose_key_does_not_match_is_recomputed(tmp_path):
    import json

    model = tiny_model("llama")
    ev, kl = _seqs(0), _seqs(1)
    dense_reference(model, ev, kl, 2, tmp_path)
    entry = next(tmp_path.glob("*.json"))
    meta = json.loads(entry.read_text())
    meta["key"]["weights"], meta["perplexity"] = "someone-else", -1.0
    entry.write_text(json.dumps(meta))
    ppl, _, cached, _ = dense_reference(model, ev, kl, 2, tmp_path)
    assert not cached and ppl == pytest.approx(perplexity(model, ev, 2), rel=F32)


def test_a_head_that_is_not_linear_caches_only_the_perplexity(tmp_path):
    """Logit soft-capping after the head: the head-input shortcut would be wrong, so it is not stored."""
    model = tiny_model("llama")
    forward = model.forward

    def capped(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = 5.0 * torch.tanh(out.logits / 5.0)
        return out

    model.forward = capped
    ev, kl = _seqs(0), _seqs(1)
    _, teacher, _, _ = dense_reference(model, ev, kl, 2, tmp_path)
    assert list(tmp_path.glob("*.safetensors")) == []
    _, teacher2, cached, _ = dense_reference(model, ev, kl, 2, tmp_path)
    assert cached and torch.equal(teacher2, teacher)
