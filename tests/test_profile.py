from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from allocator.backends import BACKENDS, compress_weight
from allocator.cli import main
from allocator.errors import AllocatorError
from allocator.inventory import Inventory, weight_view
from allocator.levels import parse_grid
from allocator.plan import Plan
from allocator.profile import Profile
from tests.conftest import VOCAB, tiny_model

GRID = parse_grid("0:0.8:0.2,w4g32")


@pytest.fixture(scope="module")
def measured():
    model = tiny_model("llama")
    inv = Inventory.from_model(model)
    calib = torch.randint(VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    return model, inv, calib, Profile.measure(model, inv, GRID, "wanda", calib, {"calib": "random"}, batch_size=2)


def test_profile_error_is_relative_output_error(measured):
    model, inv, calib, profile = measured
    layer = inv["model.layers.0.mlp.down_proj"]
    inputs = []
    handle = model.get_submodule(layer.name).register_forward_hook(lambda _m, i, _o: inputs.append(i[0]))
    with torch.no_grad():
        model(calib)
    handle.remove()
    X = torch.cat(inputs).reshape(-1, layer.cols).double()
    W = weight_view(model.get_submodule(layer.name))
    from allocator.backends.stats import LayerStats

    stats = LayerStats(layer.cols)
    stats.add_batch(torch.cat(inputs))
    for name in ("s0.4", "w4g32"):
        Q = compress_weight(W, parse_grid(name)[0], BACKENDS["wanda"], stats).double()
        ref = float(((X @ (W.double() - Q).t()) ** 2).sum() / ((X @ W.double().t()) ** 2).sum())
        got = profile.table.query("layer == @layer.name and level == @name")["error"].item()
        assert got == pytest.approx(ref, rel=1e-4)


def test_profile_shape_and_monotone_errors(measured):
    _, inv, _, profile = measured
    assert len(profile.table) == len(inv.layers) * len(GRID)
    assert (profile.table.query("level == 'dense'")["error"] == 0).all()
    pivot = profile.table.pivot(index="layer", columns="level", values="error")[["s0.2", "s0.4", "s0.6", "s0.8"]]
    assert (np.diff(pivot.to_numpy(), axis=1) > 0).all()
    assert profile.table["outlier_ratio"].between(0, 1).all()
    units = list(inv.groups)
    errors = profile.error_matrix(units, GRID)
    assert errors.shape == (len(units), len(GRID))
    s02 = profile.table.query("level == 's0.2'").set_index("layer")["error"]
    assert errors[0, 1] == pytest.approx(s02.loc[list(units[0])].sum())


def test_profile_round_trip_and_refusals(measured, tmp_path):
    _, inv, _, profile = measured
    profile.save(tmp_path / "p.parquet")
    loaded = Profile.load(tmp_path / "p.parquet")
    assert loaded.meta == profile.meta and loaded.table.equals(profile.table)
    loaded.check(inv, GRID, "wanda")
    with pytest.raises(AllocatorError, match="another model"):
        loaded.check(Inventory.from_model(tiny_model("qwen3")), GRID, "wanda")
    with pytest.raises(AllocatorError, match="lacks levels"):
        loaded.check(inv, parse_grid("s0.5"), "wanda")
    with pytest.raises(AllocatorError, match="backend"):
        loaded.check(inv, GRID, "sparsegpt")
    (tmp_path / "bad.parquet").write_text("nope")
    with pytest.raises(AllocatorError, match="not a Parquet file"):
        Profile.load(tmp_path / "bad.parquet")


def _args(tiny_model_dir, text_files, tmp_path, *extra):
    return ["run", "--model", str(tiny_model_dir), "--calib", str(text_files["calib"]),
            "--eval", str(text_files["eval"]), "--seq-len", "16", "--calib-samples", "4", "--kl-samples", "2",
            "--eval-samples", "4", "--cache-dir", str(tmp_path / "profiles"), "--backend", "wanda",
            "--levels", "0:0.9:0.1", *extra]  # fmt: skip


def test_knapsack_and_owl_runs_reuse_one_profile(tiny_model_dir, text_files, tmp_path):
    out = {m: tmp_path / m for m in ("uniform", "knapsack", "owl")}
    for method, folder in out.items():
        argv = _args(tiny_model_dir, text_files, tmp_path, "--target", "sparsity=0.5", "--method", method,
                     "--sensitivity", "error", "-o", str(folder))  # fmt: skip
        assert main(argv) == 0
    profiles = list((tmp_path / "profiles").rglob("*.parquet"))
    assert len(profiles) == 1  # measured by knapsack, reused by OWL
    profile = Profile.load(profiles[0])
    plans = {m: Plan.load(f / "plan.json") for m, f in out.items()}
    proxy = {}
    for method, plan in plans.items():
        assert plan.achieved["sparsity"] >= 0.5 - 1e-12
        proxy[method] = sum(
            profile.table.query("layer == @n and level == @lv.name")["error"].item()
            for n, lv in plan.assignment.items()
        )
    assert proxy["knapsack"] <= proxy["uniform"] + 1e-12
    assert proxy["knapsack"] <= proxy["owl"] + 1e-12
    assert len({lv.name for lv in plans["knapsack"].assignment.values()}) > 1  # non-uniform
    assert json.loads((out["knapsack"] / "metrics.json").read_text())["method"] == "knapsack"


def test_profile_for_another_model_is_refused_by_the_cli(tiny_model_dir, text_files, tmp_path, capsys, measured):
    _, _, _, profile = measured
    other = Profile(profile.table, {**profile.meta, "fingerprint": "0" * 16})
    other.save(tmp_path / "other.parquet")
    other_path = str(tmp_path / "other.parquet")
    argv = _args(tiny_model_dir, text_files, tmp_path, "--method", "knapsack", "--profile", other_path,
                 "-o", str(tmp_path / "run"))  # fmt: skip
    assert main(argv) == 2
    assert "another model" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_two_budgets_at_once(tiny_model_dir, text_files, tmp_path):
    grid = "dense,s0.5,w8,w4g32,s0.5+w4g32"
    argv = _args(tiny_model_dir, text_files, tmp_path, "--method", "knapsack", "--levels", grid,
                 "--target", "bits=6,sparsity=0.3", "-o", str(tmp_path / "run"))  # fmt: skip
    assert main(argv) == 0
    plan = Plan.load(tmp_path / "run" / "plan.json")
    assert plan.achieved["bits"] <= 6 + 1e-12 and plan.achieved["sparsity"] >= 0.3 - 1e-12
    assert [str(b) for b in plan.extra_budgets] == ["sparsity=0.3"]


def test_evolution_run_end_to_end_and_resume(tiny_model_dir, text_files, tmp_path, monkeypatch):
    monkeypatch.setenv("ALLOCATOR_CACHE", str(tmp_path / "cache"))
    common = ["--method", "evolution", "--start", "knapsack", "--generations", "3", "--offspring", "3",
              "--stages", "2@16,1@32", "--target", "sparsity=0.5", "--sensitivity", "fitted"]  # fmt: skip
    out = tmp_path / "evo"
    assert main(_args(tiny_model_dir, text_files, tmp_path, *common, "-o", str(out))) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "config.json",
        "evolution_state.json",
        "fitted_state.json",
        "history.csv",
        "history.png",
        "metrics.json",
        "plan.json",
        "sensitivity.json",
    ]  # the knapsack start's fitted sensitivity: its record and its search's checkpoint
    history = (out / "history.csv").read_text().splitlines()
    assert history[0].startswith("generation,fitness") and len(history) == 4
    plan = Plan.load(out / "plan.json")
    assert plan.method == "evolution" and plan.achieved["sparsity"] >= 0.5 - 1e-12
    # a finished search resumed with more generations continues from generation 3
    more = ["--generations", "4", "--resume", "-o", str(out)]
    assert main(_args(tiny_model_dir, text_files, tmp_path, *common, *more)) == 0
    assert len((out / "history.csv").read_text().splitlines()) == 5


def _kl_float64(dense64, inv, db, layer: str, level, seqs) -> float:
    """Mean per-token KL(dense ‖ only ``layer`` at ``level``) with the whole model in float64 (slow reference)."""
    import torch.nn.functional as F

    W = weight_view(dense64.get_submodule(layer))
    original = W.clone()
    with torch.no_grad():
        p_log = F.log_softmax(dense64(seqs).logits, dim=-1)
        W.copy_(db.weight(layer, level).double())
        q_log = F.log_softmax(dense64(seqs).logits, dim=-1)
        W.copy_(original)
    return float((p_log.exp() * (p_log - q_log)).sum() / seqs.numel())


def test_end_to_end_kl_profile(measured, tmp_path):
    from allocator.backends.database import LevelDatabase
    from allocator.budget import Budget, build_problem
    from allocator.fitness import KLFitness

    model, inv, calib, profile = measured
    dense64 = copy.deepcopy(model).double()
    db = LevelDatabase.build(model, inv, GRID, "wanda", tmp_path / "db", calib, batch_size=2)
    problem = build_problem(inv, GRID, Budget.parse("sparsity=0.5"))
    fitness = KLFitness(model, inv, problem, db, calib, batch_size=2)
    profile = Profile(profile.table.copy(), dict(profile.meta))
    rows = np.array([0, 1, 3])
    profile.add_kl(fitness, problem, rows)
    table = profile.table
    assert (table.query("level == 'dense'")["kl"] == 0).all()
    assert (table["kl"] >= 0).all()  # by construction, whatever the threads or BLAS
    # Against float64: a float32 forward perturbs each log-ratio d by η ≈ c·eps32; the KL ≈ E[d²]/2 then moves
    # by at most √(2·KL)·η + η², so entries above that floor are also strictly positive.
    eta = 16 * torch.finfo(torch.float32).eps
    checked = 0
    for _, row in table.query("level != 'dense'").iterrows():
        ref = _kl_float64(dense64, inv, db, row["layer"], parse_grid(row["level"])[0], calib[rows])
        floor = (2 * ref) ** 0.5 * eta + eta**2
        assert abs(row["kl"] - ref) <= floor, (row["layer"], row["level"], row["kl"], ref)
        checked += ref > floor
    assert checked >= 0.9 * (len(table) - len(inv.layers))  # tight enough to prove KL > 0 nearly everywhere
    # one entry against a full forward with only that layer compressed
    u, k = 9, 3
    choice = np.zeros(len(problem.units), dtype=int)
    choice[u] = k
    ref = fitness.full(choice, rows)
    got = table.query("layer == @problem.units[@u][0] and level == @GRID[@k].name")["kl"].item()
    assert got == pytest.approx(ref, rel=1e-5)


def test_profile_command_with_kl(tiny_model_dir, text_files, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ALLOCATOR_CACHE", str(tmp_path / "cache"))
    argv = ["profile", "--model", str(tiny_model_dir), "--calib", str(text_files["calib"]), "--seq-len", "16",
            "--calib-samples", "4", "--levels", "dense,s0.5,2:4", "--backend", "sparsegpt", "--kl-pool", "2",
            "--cache-dir", str(tmp_path / "profiles")]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "relative output error per level" in printed and "KL" in printed
    (path,) = (tmp_path / "profiles").rglob("*.parquet")
    table = Profile.load(path).table
    kl = table.query("level == '2:4'")["kl"]
    assert {"error", "kl", "outlier_ratio"} <= set(table.columns)
    assert (kl >= 0).all() and kl.max() > 0  # KL >= 0 by construction
