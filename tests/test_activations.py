"""Activation quantization in every model run that decides something: the KL fitness, evaluation, profiles."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from allocator.backends.activations import clear_activations_, set_activations_
from allocator.backends.database import LevelDatabase
from allocator.budget import Budget, build_problem
from allocator.fitness import KLFitness
from allocator.inventory import Inventory, weight_view
from allocator.levels import parse_grid, parse_level
from allocator.profile import Profile
from tests.conftest import VOCAB, tiny_model


def _int8_by_hand(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token symmetric int8 (compressed-tensors' fake quantization), written out in float64."""
    x64 = x.double()
    scale = x64.abs().amax(-1, keepdim=True) / 127.5
    scale = torch.where(scale == 0, torch.finfo(x.dtype).eps, scale)
    return (torch.round((x64 / scale).clamp(-128, 127)) * scale).to(x.dtype)


def test_the_kl_of_a_plan_with_int8_activations_is_its_own_and_equals_quantizing_inputs_by_hand(tmp_path):
    model = tiny_model("llama")
    inv = Inventory.from_model(model)
    calib = torch.randint(VOCAB, (6, 24), generator=torch.Generator().manual_seed(0))
    grid = parse_grid("w4,w4+a8")
    db = LevelDatabase.build(model, inv, grid, "rtn", tmp_path / "db", calib, batch_size=3)
    problem = build_problem(inv, db.levels, Budget.parse("bits=16"))
    fitness = KLFitness(model, inv, problem, db, calib, batch_size=3)
    names = [lv.name for lv in problem.levels]
    rows = np.arange(6)
    weights_only = fitness(np.full(len(problem.units), names.index("w4")), rows)
    w4a8 = fitness(np.full(len(problem.units), names.index("w4+a8")), rows)
    assert weights_only > 0 and abs(w4a8 / weights_only - 1) > 1e-3
    # slow reference: a fresh model, the w8 weights, every linear's input quantized by hand, KL in float64
    reference = tiny_model("llama")
    with torch.no_grad():
        teacher = F.log_softmax(reference(calib).logits.double(), -1)
        for lay in inv.layers:
            weight_view(reference.get_submodule(lay.name)).copy_(db.weight(lay.name, parse_level("w4")))
            reference.get_submodule(lay.name).register_forward_pre_hook(lambda _m, a: (_int8_by_hand(a[0]),))
        student = F.log_softmax(reference(calib).logits.double(), -1)
    kl = float((teacher.exp() * (teacher - student)).sum(-1).mean())
    # the fitness takes log-softmax in float32: its error on the logits bounds the agreement
    assert abs(w4a8 - kl) <= 1e-3 * kl


def test_hooks_follow_the_levels_and_the_dense_model_has_none():
    model = tiny_model("llama")
    inv = Inventory.from_model(model)
    x = torch.randint(VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(x).logits
        set_activations_(model, {lay.name: parse_level("w8") for lay in inv.layers}, {})
        assert torch.equal(model(x).logits, dense)  # a weight-only level installs nothing
        set_activations_(model, {lay.name: parse_level("fp8+afp8") for lay in inv.layers}, {})
        assert not torch.equal(model(x).logits, dense)
        clear_activations_(model)
        assert torch.equal(model(x).logits, dense)


def test_a_profile_counts_what_activation_quantization_adds():
    model = tiny_model("llama")
    inv = Inventory.from_model(model)
    calib = torch.randint(VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    profile = Profile.measure(model, inv, parse_grid("w8,w8+a8,fp8+afp8"), "rtn", calib, {"seed": 0}, batch_size=2)
    t = profile.table.set_index(["layer", "level"])
    for lay in inv.layers:
        for column in ("error", "fisher"):
            assert t.loc[(lay.name, "w8+a8"), column] > t.loc[(lay.name, "w8"), column] > 0
