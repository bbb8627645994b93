"""Fused routed experts unfused into per-expert linears and back, without changing a weight or an output."""

from __future__ import annotations

import pytest
import torch

from allocator.model import Inventory, weight_view
from allocator.moe import fuse_experts, unfuse_experts
from tests.conftest import MOE, VOCAB, tiny_model


@pytest.mark.parametrize("family", list(MOE))
def test_unfuse_then_fuse_restores_the_state_dict(family):
    model = tiny_model(family)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    assert unfuse_experts(model) == 2 and unfuse_experts(model) == 0  # one per block, idempotent
    assert fuse_experts(model) == 2
    restored = model.state_dict()
    assert restored.keys() == original.keys()
    assert all(torch.equal(restored[k], original[k]) for k in original)


def test_a_compressed_expert_is_saved_where_transformers_reads_it():
    model = tiny_model("mixtral")
    inv = Inventory.from_model(model)
    name = next(lay.name for lay in inv.layers if lay.name.endswith("experts.2.down_proj"))
    weight_view(model.get_submodule(name)).zero_()
    fuse_experts(model)
    fused = model.model.layers[0].mlp.experts.down_proj
    assert not fused[2].any() and fused[1].any()
    x = torch.randint(VOCAB, (1, 8))
    assert torch.isfinite(model(x).logits).all()


def test_per_expert_role_gives_all_experts_of_a_role_one_level():
    from allocator.budget import Budget, build_problem
    from allocator.levels import parse_grid
    from allocator.search import get_searcher

    inv = Inventory.from_model(tiny_model("mixtral"))
    per_layer = build_problem(inv, parse_grid("0:0.9:0.1"), Budget.parse("sparsity=0.5"))
    per_role = build_problem(inv, parse_grid("0:0.9:0.1"), Budget.parse("sparsity=0.5"), per="expert-role")
    # per block: q/k/v, o, then all 4 experts' gate_up_proj, then their down_proj
    assert len(per_layer.units) == 2 * (4 + 4 * 2) and len(per_role.units) == 2 * 4
    experts = [u for u in per_role.units if ".experts." in u[0]]
    assert all(len(u) == 4 and len({n.rsplit(".", 1)[1] for n in u}) == 1 for u in experts)
    assert per_role.cost.sum() == pytest.approx(per_layer.cost.sum())  # the same weights, priced the same
    choice = get_searcher("uniform").search(per_role, 0)
    assignment = per_role.assignment(choice)
    assert len(assignment) == len(inv.layers) and len({assignment[n] for n in experts[0]}) == 1
