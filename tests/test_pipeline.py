"""A run measures only what its method declares, and a plan carries everything needed to reproduce it."""

from __future__ import annotations

import shutil

import pytest
from safetensors.torch import load_file

import allocator.backends
import allocator.pipeline
import allocator.profile
import allocator.workspace
from allocator.backends.database import LevelDatabase
from allocator.cli import main
from allocator.plan import Plan
from allocator.profile import Profile
from tests.test_cli import _args


def _forbid(monkeypatch, *what: str) -> None:
    def refuse(*_a, **_k):
        raise AssertionError("measured something this method does not need")

    targets = {"profile": (Profile, "measure"), "database": (LevelDatabase, "build"),
               "fitness": (allocator.pipeline, "KLFitness"), "kl": (allocator.workspace, "KLFitness")}  # fmt: skip
    for name in what:
        monkeypatch.setattr(*targets[name], refuse)


@pytest.mark.parametrize("method", ["uniform", "owl"])
def test_uniform_and_owl_build_no_database_and_measure_no_plan(method, tiny_model_dir, text_files, tmp_path,
                                                                monkeypatch):  # fmt: skip
    _forbid(monkeypatch, "profile", "database", "fitness", "kl")
    passes = []
    real = allocator.profile.blockwise
    for module in (allocator.profile, allocator.backends):  # the input statistics' pass, the backend's own
        monkeypatch.setattr(module, "blockwise", lambda *a, **k: passes.append(1) or real(*a, **k))
    cache = tmp_path / "cache"
    argv = _args(tiny_model_dir, text_files, tmp_path / "run", "--method", method, "--backend", "wanda",
                 "--levels", "0:0.9:0.05", "--target", "sparsity=0.6", "--cache-dir", str(cache))  # fmt: skip
    assert main(argv) == 0
    assert not (cache / "db").exists() and not (cache / "profiles").exists()
    assert len(passes) == 1  # one calibration pass: OWL's outlier ratios and Wanda's column norms from the same
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.json", "metrics.json", "plan.json"]


def test_knapsack_with_the_fisher_sensitivity_measures_a_profile_but_no_plan(tiny_model_dir, text_files, tmp_path,
                                                                               monkeypatch):  # fmt: skip
    _forbid(monkeypatch, "database", "fitness", "kl")
    argv = _args(tiny_model_dir, text_files, tmp_path / "run", "--method", "knapsack", "--sensitivity", "fisher",
                 "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert main(argv) == 0
    assert len(list((tmp_path / "cache" / "profiles").rglob("*.parquet"))) == 1


def test_a_plan_copied_alone_applies_and_exports_bit_for_bit_as_in_its_run_folder(tiny_model_dir, text_files,
                                                                                    tmp_path):  # fmt: skip
    run = tmp_path / "run"
    argv = _args(tiny_model_dir, text_files, run, "--method", "knapsack", "--sensitivity", "fisher", "--backend",
                 "wanda", "--levels", "0:0.8:0.2", "--target", "sparsity=0.5", "--seed", "3",
                 "--cache-dir", str(tmp_path / "cache"))  # fmt: skip
    assert main(argv) == 0
    alone = tmp_path / "elsewhere" / "plan.json"
    alone.parent.mkdir()
    shutil.copy(run / "plan.json", alone)
    assert main(["apply", str(run / "plan.json"), "-o", str(tmp_path / "ckpt_run")]) == 0
    assert main(["apply", str(alone), "-o", str(tmp_path / "ckpt_alone")]) == 0
    a = load_file(tmp_path / "ckpt_run" / "model.safetensors")
    b = load_file(tmp_path / "ckpt_alone" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    plan = Plan.load(alone)
    assert plan.backend["name"] == "wanda" and plan.data["seed"] == 3
    # Wanda's masks, not magnitude's: the default backend would have given another checkpoint
    assert main(["apply", str(alone), "-o", str(tmp_path / "ckpt_magnitude"), "--backend", "magnitude"]) == 0
    c = load_file(tmp_path / "ckpt_magnitude" / "model.safetensors")
    assert any(not a[k].equal(c[k]) for k in a)
    for fmt in ("llmcompressor", "json", "csv"):
        assert main(["export", str(alone), "--to", fmt]) == 0
    assert "WandaPruningModifier" in (alone.parent / "exports" / "llmcompressor" / "recipe.yaml").read_text()


def test_wanda_plans_of_one_session_share_one_input_pass(tiny_model_dir, text_files, tmp_path, monkeypatch):
    """Wanda reads only column norms of the dense inputs: a session gathers them once (compare's uniform and
    knapsack cells, a run's plan after OWL's pass), and the weights equal a fresh calibration pass's, bit for bit."""
    import torch

    import allocator.session
    from allocator.backends import apply_
    from allocator.inventory import weight_view
    from allocator.levels import parse_level
    from allocator.session import Session
    from allocator.spec import RunConfig
    from tests.conftest import tiny_model

    passes = []
    gather = allocator.session.input_stats
    monkeypatch.setattr(allocator.session, "input_stats", lambda *a, **k: passes.append(1) or gather(*a, **k))
    session = Session(RunConfig(model=str(tiny_model_dir), calib=str(text_files["calib"]), eval=str(text_files["eval"]),
                                backend="wanda", seq_len=16, calib_samples=4, eval_samples=2, kl_samples=2,
                                batch_size=3, dense_cache=False, cache_dir=str(tmp_path / "c")))  # fmt: skip
    names = [x.name for x in session.inventory.layers]
    for sparsity in ("s0.3", "s0.6"):
        plan = {n: parse_level(sparsity if i % 2 else "s0.5") for i, n in enumerate(names)}
        session.compress_(plan, "wanda")
        fresh = tiny_model("llama")
        apply_(fresh, plan, "wanda", session.calib, 3)
        for n in names:
            assert torch.equal(weight_view(session.model.get_submodule(n)), weight_view(fresh.get_submodule(n))), n
    assert len(passes) == 1


def test_auto_prior_measures_the_kl_column_only_within_its_time_limit(tiny_model_dir, text_files, tmp_path):
    """``auto`` takes the per-layer KL only where measuring it fits ``KL_AUTO_S`` (estimated from a timed forward
    before any entry is measured): over the limit nothing is measured and the Fisher prior is used."""
    from allocator.levels import parse_grid, with_dense
    from allocator.pipeline import _auto
    from allocator.session import Session
    from allocator.spec import RunConfig

    session = Session(RunConfig(model=str(tiny_model_dir), calib=str(text_files["calib"]), eval=str(text_files["eval"]),
                                backend="magnitude", seq_len=16, calib_samples=4, eval_samples=2, kl_samples=2,
                                batch_size=2, fit_seqs=2, dense_cache=False, cache_dir=str(tmp_path)))  # fmt: skip
    grid = with_dense(parse_grid("0.3:0.6:0.3"))
    profile = session.profile(grid, "magnitude", with_database=True)
    assert not session.add_kl(profile, grid, "magnitude", limit_s=0.0)
    assert "kl" not in profile.table and profile.meta["kl_estimate_s"] > 0
    assert _auto(session, profile, grid, "magnitude") == "fisher"  # a CPU never measures it for auto
    assert session.add_kl(profile, grid, "magnitude", limit_s=1e9)
    kl = profile.table["kl"]
    assert (kl[profile.table["level"] == "dense"] == 0).all() and (kl[profile.table["level"] != "dense"] > 0).all()
    assert _auto(session, profile, grid, "magnitude") == "kl"  # measured once: kept
