"""The command line: the main job on a tiny local model, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from allocator.cli import main
from allocator.plan import Plan


def _args(tiny_model_dir, text_files, out, *extra):
    return [
        "run",
        "--model",
        str(tiny_model_dir),
        "--calib",
        str(text_files["calib"]),
        "--eval",
        str(text_files["eval"]),
        "--seq-len",
        "16",
        "--calib-samples",
        "2",
        "--kl-samples",
        "2",
        "--eval-samples",
        "4",
        "-o",
        str(out),
        *extra,
    ]


def test_run_writes_plan_and_metrics(tiny_model_dir, text_files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_model_dir, text_files, out, "--target", "sparsity=0.3")) == 0
    printed = capsys.readouterr().out
    assert "dense perplexity" in printed and "compressed perplexity" in printed
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.json", "plan.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["achieved"]["sparsity"] >= 0.3
    assert metrics["perplexity"] > 0 and metrics["kl_to_dense"] > 0
    assert metrics["bos_per_window"] is False  # this tokenizer adds no BOS: windows are raw text
    plan = Plan.load(out / "plan.json")
    assert plan.data["seq_len"] == 16 and plan.data["bos_per_window"] is False
    assert {lv.name for lv in plan.assignment.values()} == {"s0.3"}
    assert json.loads((out / "config.json").read_text())["versions"]["torch"]

    # re-applying the saved plan reproduces the same compressed model and metrics
    again = tmp_path / "again"
    assert main(_args(tiny_model_dir, text_files, again, "--plan", str(out / "plan.json"))) == 0
    assert json.loads((again / "metrics.json").read_text())["perplexity"] == pytest.approx(metrics["perplexity"])


def test_bos_tokenizer_windows_are_recorded_in_plan_and_metrics(tmp_path, bos_tokenizer, text_files):
    """A tokenizer that adds BOS: every window starts with it, and plan and metrics say so."""
    from tests.conftest import tiny_model

    folder = tmp_path / "tiny-bos"
    tiny_model("llama").save_pretrained(folder)
    bos_tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    assert main(_args(folder, text_files, out, "--target", "sparsity=0.3", "--no-dense-cache")) == 0
    assert json.loads((out / "metrics.json").read_text())["bos_per_window"] is True
    assert Plan.load(out / "plan.json").data["bos_per_window"] is True


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines  # one line, and the last word
    return errors[0]


def test_output_that_is_a_file_or_unwritable_is_refused_before_the_run(tiny_model_dir, text_files, tmp_path, capsys):
    import os

    a_file = tmp_path / "taken"
    a_file.write_text("mine")
    assert "is a file" in _error(capsys, _args(tiny_model_dir, text_files, a_file))
    assert a_file.read_text() == "mine"
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):  # root may write anywhere: then there is nothing to refuse
            assert "writable" in _error(capsys, _args(tiny_model_dir, text_files, locked / "run"))
    finally:
        locked.chmod(0o700)


def test_plan_for_another_model_and_corrupt_plan(tiny_model_dir, text_files, tmp_path, capsys):
    from tests.test_plan import _plan

    other, _ = _plan("qwen3")
    other.save(tmp_path / "other.json")
    (tmp_path / "corrupt.json").write_text('{"schema_version": 1, "model": ')
    out = tmp_path / "run"
    err = _error(capsys, _args(tiny_model_dir, text_files, out, "--plan", str(tmp_path / "other.json")))
    assert "another model" in err
    err = _error(capsys, _args(tiny_model_dir, text_files, out, "--plan", str(tmp_path / "corrupt.json")))
    assert "not valid JSON" in err
    assert not out.exists()


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "allocator.cli", "run", "--target", "sparsity=1.5", "-o", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    expected = "error: target sparsity must be in [0, 1), got 1.5: e.g. --target sparsity=0.5"
    assert proc.stderr.strip().splitlines() == [expected]


def test_optuna_pareto_run_writes_a_plan_per_front_point(tiny_model_dir, text_files, tmp_path):
    out = tmp_path / "pareto"
    args = _args(tiny_model_dir, text_files, out, "--target", "sparsity=0.5", "--method", "optuna",
                 "--objectives", "fitness,bytes", "--sampler", "nsga2", "--trials", "12",
                 "--levels", "0:0.8:0.2", "--backend", "wanda", "--cache-dir", str(tmp_path / "p"))  # fmt: skip
    assert main(args) == 0
    front = (out / "pareto.csv").read_text().splitlines()
    assert len(front) >= 2 and (out / "pareto.png").is_file() and (out / "optuna.journal").is_file()
    for line in front[1:]:
        plan = Plan.load(out / line.split(",")[0])
        assert plan.achieved["sparsity"] >= 0.5 - 1e-9  # every front plan within the budget
    assert (out / "history.csv").read_text().count("\n") == 13  # header + 12 trials


def test_latency_budget_and_latency_pareto_run(tiny_model_dir, text_files, tmp_path):
    """A table measured here (CPU), then a speed-up budget and a fitness-vs-latency front through `run`."""
    assert main(["latency", "measure", "--model", str(tiny_model_dir), "--device", "cpu", "--tokens", "1,8",
                 "--kernels", "dense,rows0.5", "--repeats", "3", "--out", str(tmp_path / "lat")]) == 0  # fmt: skip
    (table,) = (tmp_path / "lat").glob("*/*.csv")
    out = tmp_path / "front"
    args = _args(tiny_model_dir, text_files, out, "--target", "speedup=1", "--method", "optuna",
                 "--objectives", "fitness,latency", "--sampler", "nsga2", "--trials", "8", "--latency-table",
                 str(table), "--latency-tokens", "4", "--levels", "dense,w8,w4g32", "--backend", "rtn",
                 "--cache-dir", str(tmp_path / "p"))  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["latency"]["tokens"] == 4 and metrics["latency"]["speedup"] >= 1 - 1e-9
    front = (out / "pareto.csv").read_text().splitlines()
    assert "latency_ms" in front[0] and len(front) >= 2 and (out / "pareto.png").is_file()


def test_over_budget_plan_is_refused_unless_allowed(tiny_model_dir, text_files, tmp_path, capsys):
    """A plan whose levels break its own budget: run --plan, apply and export refuse it with the numbers."""
    good = tmp_path / "good"
    assert main(_args(tiny_model_dir, text_files, good, "--target", "sparsity=0.3")) == 0
    data = json.loads((good / "plan.json").read_text())
    data["assignment"] = dict.fromkeys(data["assignment"], "s0.1")
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / "plan.json").write_text(json.dumps(data))
    (bad_dir / "config.json").write_text((good / "config.json").read_text())
    bad = str(bad_dir / "plan.json")
    capsys.readouterr()
    message = _error(capsys, _args(tiny_model_dir, text_files, tmp_path / "refused", "--plan", bad))
    assert "breaks its budget sparsity=0.3: achieves sparsity 0.1" in message and "--allow-over-budget" in message
    assert not (tmp_path / "refused").exists()
    assert "breaks its budget" in _error(capsys, ["export", bad, "--to", "json", "-o", str(tmp_path / "exp")])
    assert "breaks its budget" in _error(capsys, ["apply", bad, "-o", str(tmp_path / "ckpt")])
    assert not (tmp_path / "exp").exists() and not (tmp_path / "ckpt").exists()
    allowed = tmp_path / "allowed"
    argv = _args(tiny_model_dir, text_files, allowed, "--plan", bad, "--allow-over-budget")
    assert main(argv) == 0
    assert json.loads((allowed / "metrics.json").read_text())["over_budget"][0].startswith("sparsity=0.3")
    assert main(["export", bad, "--to", "json", "-o", str(tmp_path / "exp"), "--allow-over-budget"]) == 0
