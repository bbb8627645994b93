"""Sensitivities on the model's scale: Fisher-weighted output error and the fitted additive model."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from allocator.budget import Budget, build_problem
from allocator.errors import AllocatorError
from allocator.inventory import Inventory
from allocator.levels import parse_grid
from allocator.search.additive import fit
from allocator.search.fitted import random_plans, refine
from allocator.search.knapsack import Knapsack
from allocator.sensitivity.fisher import fisher_error, output_fisher, row_energy, sample_labels
from tests.conftest import VOCAB, tiny_model


def test_output_fisher_converges_to_the_exact_expected_squared_gradient():
    model = tiny_model("llama").double()
    inv = Inventory.from_model(model)
    name = "model.layers.1.mlp.down_proj"
    seq = torch.randint(VOCAB, (1, 6), generator=torch.Generator().manual_seed(0))
    # exact: E_y[g_ti²] = Σ_t' (J_t'ᵀ (diag p_t' − p_t' p_t'ᵀ) J_t')_{(t,i),(t,i)}, J = d logits / d layer output
    captured = {}
    handle = model.get_submodule(name).register_forward_hook(lambda _m, _i, out: captured.setdefault("y", out))
    with torch.no_grad():
        model(seq)
    handle.remove()

    def logits_from(y: torch.Tensor) -> torch.Tensor:
        h = model.get_submodule(name).register_forward_hook(lambda _m, _i, _o: y)
        try:
            return model(seq).logits[0]
        finally:
            h.remove()

    J = torch.autograd.functional.jacobian(logits_from, captured["y"])[:, :, 0]  # [T, V, T, rows]
    p = torch.softmax(logits_from(captured["y"]).detach(), -1)  # [T, V]
    exact = torch.zeros(J.shape[2:], dtype=torch.float64)
    for t in range(J.shape[0]):
        C = torch.diag(p[t]) - torch.outer(p[t], p[t])  # covariance of e_y − p under y ~ p
        Jt = J[t].reshape(VOCAB, -1)
        exact += ((C @ Jt) * Jt).sum(0).reshape(exact.shape)
    exact = exact.mean(0)  # mean over token positions t, [rows]
    est = output_fisher(model, inv, seq.repeat(800, 1), batch_size=200, seed=0)[name].double()
    assert est.sum().item() == pytest.approx(exact.sum().item(), rel=0.05)  # Monte Carlo over 4,800 labels
    assert np.corrcoef(est.numpy(), exact.numpy())[0, 1] > 0.95


def test_sampled_labels_follow_the_softmax_and_are_seeded():
    """Inverse-CDF sampling: label frequencies over 200,000 draws match the softmax (a binomial 5-sigma band per
    label, zero-probability labels never drawn), and one seed gives one draw."""
    logits = torch.tensor([[2.0, 0.0, -1.0, float("-inf"), 1.0, -3.0]]).repeat(200_000, 1)
    labels = sample_labels(logits, torch.Generator().manual_seed(0))
    p = logits[0].softmax(-1).double()
    freq = torch.bincount(labels, minlength=6).double() / len(labels)
    assert (freq - p).abs().le(5 * (p * (1 - p) / len(labels)).sqrt() + 1e-12).all() and freq[3] == 0
    assert torch.equal(labels[:1000], sample_labels(logits[:1000], torch.Generator().manual_seed(0)))


def test_fisher_error_equals_the_brute_force_weighted_output_error():
    gen = torch.Generator().manual_seed(0)
    X, D, f = torch.randn(50, 12, generator=gen), torch.randn(7, 12, generator=gen), torch.rand(7, generator=gen)
    H = 2 / 50 * X.t() @ X
    brute = 0.5 * sum(float(f[i]) * float(((X @ D[i]) ** 2).mean()) for i in range(7))
    assert fisher_error(row_energy(D, H), f) == pytest.approx(brute, rel=1e-5)
    assert float(row_energy(D, H).sum()) == pytest.approx(float(((X @ D.t()) ** 2).sum() * 2 / 50), rel=1e-5)


def test_fisher_column_predicts_measured_kl(tmp_path):
    """On the model's scale: the fisher column tracks the measured single-layer KL (rank and magnitude)."""
    from allocator.backends.database import LevelDatabase
    from allocator.fitness import KLFitness
    from allocator.profile import Profile

    model = tiny_model("llama")
    inv = Inventory.from_model(model)
    calib = torch.randint(VOCAB, (8, 32), generator=torch.Generator().manual_seed(0))
    grid = parse_grid("0:0.6:0.2,w4g32")
    profile = Profile.measure(model, inv, grid, "wanda", calib, {"seed": 0}, batch_size=4)
    db = LevelDatabase.build(model, inv, grid, "wanda", tmp_path / "db", calib, batch_size=4)
    problem = build_problem(inv, grid, Budget.parse("sparsity=0.3"))
    profile.add_kl(KLFitness(model, inv, problem, db, calib, batch_size=4), problem, np.arange(8))
    t = profile.table.query("level != 'dense'")
    assert spearmanr(t["fisher"], t["kl"]).statistic > 0.8
    ratio = (t["fisher"] / t["kl"]).median()
    assert 0.7 < ratio < 1.4  # same units (nats per token), not merely correlated (measured: 0.97-0.99)
    assert spearmanr(t["fisher"], t["kl"]).statistic > spearmanr(t["error"], t["kl"]).statistic


def _synthetic(U=12, K=5, seed=0):
    """A problem whose true KL is Σ_u w_u·prior[u, k] with known w (prior rising with compression)."""
    rng = np.random.default_rng(seed)
    grid = parse_grid("0:0.8:0.2")
    prior = np.cumsum(rng.uniform(0.1, 1.0, (U, K)), axis=1) - 0.1
    prior[:, 0] = 0
    w = rng.uniform(0.2, 3.0, U)
    from allocator.budget import Problem

    cost = np.tile(np.array([1 - lv.sparsity for lv in grid]) * 100, (U, 1))
    problem = Problem([(f"u{i}",) for i in range(U)], grid, cost, limit=0.5 * 100 * U)
    return problem, prior, w


def test_fit_recovers_known_additive_costs_and_predicts_held_out_plans():
    problem, prior, w = _synthetic()
    start = np.full(len(w), 2)  # sparsity 0.4 everywhere: inside the 0.5 budget
    plans = random_plans(problem, start, 60, seed=0)
    assert all(problem.feasible(p) for p in plans) and len({p.tobytes() for p in plans}) == 60
    kl = (prior[np.arange(len(w)), plans] * w).sum(1)
    model = fit(prior, plans, kl)
    np.testing.assert_allclose(model.weights, w, rtol=1e-2)
    assert model.held_out["spearman"] > 0.99 and model.held_out["r2"] > 0.99
    with pytest.raises(AllocatorError, match="at least"):
        fit(prior, plans[:4], kl[:4])


def test_fit_on_paired_differences_cancels_what_the_tokens_share():
    """Each pair scored on its own tokens: a per-pair offset far larger than the plans' differences cancels in
    the difference, and the weights come back as from noise-free plans; without the pairing they do not."""
    problem, prior, w = _synthetic(seed=2)
    start = np.full(len(w), 2)
    plans = random_plans(problem, start, 120, seed=3)
    children, parents = plans[:60], plans[60:]
    rows = np.arange(len(w))
    offset = np.random.default_rng(5).normal(0, 50.0, 60)  # the tokens' own difficulty, shared within a pair
    child_kl = (prior[rows, children] * w).sum(1) + offset
    parent_kl = (prior[rows, parents] * w).sum(1) + offset
    paired = fit(prior, children, child_kl - parent_kl, baseline=parents)
    np.testing.assert_allclose(paired.weights, w, rtol=1e-2)
    unpaired = fit(prior, children, child_kl)
    assert np.abs(unpaired.weights - w).max() > 0.1


def test_refine_reaches_the_true_optimum_of_a_known_additive_model():
    problem, prior, w = _synthetic(seed=1)
    truth = prior * w[:, None]
    optimum = Knapsack().search(problem.with_sensitivity(truth)).choice

    def solve(costs):
        return Knapsack().search(problem.with_sensitivity(costs)).choice

    start = np.full(len(w), 2)
    model, final, record = refine(problem, prior, lambda c: float(truth[np.arange(len(w)), c].sum()), solve, start,
                                  plans=30, rounds=2, seed=0)  # fmt: skip
    assert np.array_equal(final, solve(model.costs(prior)))  # the plan is the knapsack of the fit returned
    assert truth[np.arange(len(w)), final].sum() == pytest.approx(truth[np.arange(len(w)), optimum].sum(), rel=1e-9)
    history = record["history"]  # the prior's own solution, the first fit's, then one per round
    assert [h["round"] for h in history] == [-1, 0, 1, 2] and history[-1]["plans"] >= 31
    # the fit returned is the one whose solution measured best
    assert truth[np.arange(len(w)), final].sum() == pytest.approx(min(h["proposal_kl"] for h in history), rel=1e-12)
    assert history[record["chosen_round"] + 1]["proposal_kl"] == min(h["proposal_kl"] for h in history)
    # the plain prior (w = 1) is worse than the fitted costs on this problem
    naive = solve(prior)
    assert truth[np.arange(len(w)), naive].sum() > truth[np.arange(len(w)), final].sum()


def test_random_plans_are_deterministic():
    problem, _, _ = _synthetic()
    a = random_plans(problem, np.full(12, 2), 20, seed=3)
    b = random_plans(copy.deepcopy(problem), np.full(12, 2), 20, seed=3)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("kind", ["error", "fisher", "kl", "fitted"])
def test_knapsack_run_with_each_sensitivity(kind, tiny_model_dir, text_files, tmp_path, monkeypatch):
    import json

    from allocator.cli import main
    from allocator.plan import Plan

    monkeypatch.setenv("ALLOCATOR_CACHE", str(tmp_path / "cache"))
    out = tmp_path / kind
    argv = ["run", "--model", str(tiny_model_dir), "--calib", str(text_files["calib"]), "--eval",
            str(text_files["eval"]), "--seq-len", "16", "--calib-samples", "8", "--kl-samples", "2",
            "--eval-samples", "4", "--cache-dir", str(tmp_path / "profiles"), "--backend", "wanda",
            "--levels", "0:0.8:0.2", "--target", "sparsity=0.4", "--method", "knapsack", "--sensitivity", kind,
            "--fit-seqs", "4", "--fit-plans", "12", "--fit-rounds", "1", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    plan = Plan.load(out / "plan.json")
    assert plan.achieved["sparsity"] >= 0.4 - 1e-12
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sensitivity"]["kind"] == kind
    if kind == "fitted":
        record = json.loads((out / "sensitivity.json").read_text())
        assert len(record["kl"]) >= 12 and -1 <= record["held_out"]["spearman"] <= 1
        assert [h["round"] for h in record["history"]] == [-1, 0, 1]  # the prior, the first fit, one round


def test_refine_keeps_the_prior_when_every_fit_misleads():
    """A measured KL no additive model of these plans explains: the prior's own solution is returned."""
    problem, prior, w = _synthetic(seed=2)

    def solve(costs):
        return Knapsack().search(problem.with_sensitivity(costs)).choice

    plain = solve(prior)
    rows = np.arange(len(w))

    def measure(c):  # anti-correlated with the prior everywhere except at the prior's own solution
        return 0.0 if np.array_equal(c, plain) else 100.0 - float(prior[rows, c].sum())

    model, choice, record = refine(problem, prior, measure, solve, np.full(len(w), 2), plans=30, rounds=2, seed=0)
    assert record["chosen_round"] == -1 and np.array_equal(model.weights, np.ones(len(w)))
    assert np.array_equal(solve(model.costs(prior)), plain) and np.array_equal(choice, plain)
