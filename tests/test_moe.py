"""Fused routed experts unfused into per-expert linears and back, without changing a weight or an output."""

from __future__ import annotations

import pytest
import torch

from allocator.inventory import Inventory, weight_view
from allocator.moe import fuse_experts, unfuse_experts
from tests.conftest import MOE, VOCAB, search, tiny_model


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

    inv = Inventory.from_model(tiny_model("mixtral"))
    per_layer = build_problem(inv, parse_grid("0:0.9:0.1"), Budget.parse("sparsity=0.5"))
    per_role = build_problem(inv, parse_grid("0:0.9:0.1"), Budget.parse("sparsity=0.5"), per="expert-role")
    # per block: q/k/v, o, then all 4 experts' gate_up_proj, then their down_proj
    assert len(per_layer.units) == 2 * (4 + 4 * 2) and len(per_role.units) == 2 * 4
    experts = [u for u in per_role.units if ".experts." in u[0]]
    assert all(len(u) == 4 and len({n.rsplit(".", 1)[1] for n in u}) == 1 for u in experts)
    assert per_role.cost.sum() == pytest.approx(per_layer.cost.sum())  # the same weights, priced the same
    choice = search("uniform", per_role, 0).choice
    assignment = per_role.assignment(choice)
    assert len(assignment) == len(inv.layers) and len({assignment[n] for n in experts[0]}) == 1


def test_llamacpp_takes_per_expert_role_plans_on_ggufs_expert_tensors():
    """GGUF holds a block's experts in one tensor per projection (gguf-py's FFN_*_EXP names): a per-expert-role
    plan maps onto them, a plan splitting one block's experts is refused, naming the fix."""
    import re

    import gguf

    from allocator.budget import Budget
    from allocator.errors import AllocatorError
    from allocator.export import EXPORTERS
    from allocator.levels import parse_grid
    from allocator.plan import Plan

    inv = Inventory.from_model(tiny_model("mixtral"))
    grid = parse_grid("dense,w8,w4g32,w2g32")
    role_level = {"gate_up_proj": grid[1], "down_proj": grid[2]}
    assignment = {
        lay.name: role_level[lay.role.rsplit(".", 1)[1]] if ".experts." in lay.name else grid[3] for lay in inv.layers
    }
    plan = Plan.create(assignment, inv, "tiny-mixtral", Budget("bits", 16), grid, "test", 0)
    back = Plan.from_dict(plan.to_dict())
    assert back.shares == plan.shares and set(plan.shares.values()) == {0.5} and back.attention == ["full", "full"]
    rules = dict(line.rsplit("=", 1) for line in EXPORTERS["llamacpp"](plan)["tensor-types.txt"].split())
    names = gguf.TENSOR_NAMES
    for b in range(inv.n_blocks):
        for tensor, ggml in ((gguf.MODEL_TENSOR.FFN_GATE_EXP, "q8_0"), (gguf.MODEL_TENSOR.FFN_UP_EXP, "q8_0"),
                             (gguf.MODEL_TENSOR.FFN_DOWN_EXP, "q4_K")):  # fmt: skip
            name = names[tensor].format(bid=b) + ".weight"
            hits = [t for p, t in rules.items() if re.search(p, name)]
            assert hits == [ggml], (name, hits)
        attn = names[gguf.MODEL_TENSOR.ATTN_Q].format(bid=b) + ".weight"
        assert [t for p, t in rules.items() if re.search(p, attn)] == ["q2_K"]
    split = dict(assignment)
    split[next(n for n in split if n.endswith("experts.1.down_proj"))] = grid[0]
    with pytest.raises(AllocatorError, match=r"ffn_down_exps.*--per expert-role"):
        EXPORTERS["llamacpp"](Plan.create(split, inv, "tiny-mixtral", Budget("bits", 16), grid, "test", 0))
