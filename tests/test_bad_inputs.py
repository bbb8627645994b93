"""Bad input through the command line, as a new user would give it (issue 16).

Every case must give exit code 2, exactly one ``error:`` line (argparse's usage lines aside), no traceback,
and leave no new file or folder anywhere under the test's world (outputs, profiles, caches, working folder).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from allocator.cli import main
from allocator.hub import hub_reachable
from tests.conftest import text_lines, tiny_model, word_tokenizer

W = dict  # the world: named paths shared by the cases


@dataclass(frozen=True)
class Case:
    argv: Callable[[W], list[str]]
    match: str  # a fragment of the expected error line


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> W:
    """A tiny model, texts, one good run, and every kind of damaged file, built once for all cases."""
    root = tmp_path_factory.mktemp("world")
    w: W = {"root": root, "cache": root / "cache", "profiles": root / "profiles", "cwd": root / "cwd"}
    w["cwd"].mkdir()
    w["model"] = root / "tiny"
    tiny_model("llama").save_pretrained(w["model"])
    word_tokenizer().save_pretrained(w["model"])
    for name, seed in (("calib", 1), ("eval", 2)):
        w[name] = root / f"{name}.txt"
        w[name].write_text("\n".join(text_lines(60, seed)) + "\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ALLOCATOR_CACHE", str(w["cache"]))
        assert main([*_run(w, root / "good"), "--target", "sparsity=0.3"]) == 0
    w["plan"] = root / "good" / "plan.json"
    plan = json.loads(w["plan"].read_text())
    _files(w, plan)
    return w


def _files(w: W, plan: dict) -> None:
    root = w["root"]
    writes = {
        "binary": bytes(range(256)) * 4,
        "nul.txt": b"text\x00\x00more\n",
        "broken.parquet": b"PAR1 not really",
        "empty.txt": b"",
        "blank.txt": b"\n \n\t\n",
        "short.txt": b"the model\n",
        "notjson.json": b'{"schema_version": 1, "model": ',
        "list.json": b"[1, 2]",
        "truncated.gguf": b"GGUF\x03\x00\x00\x00" + bytes(12),
        "text.gguf": b"just some text\n",
        "afile": b"mine",
        "bad.csv": b'"unclosed,\x00\n1,2',
    }
    for name, content in writes.items():
        key = name.replace(".", "_")  # a format field: {short_txt}
        w[key] = root / name
        w[key].write_bytes(content)
    _plan_variant(w, "old_schema", plan, schema_version=0)
    _plan_variant(w, "over_budget", plan, assignment=dict.fromkeys(plan["assignment"], "s0.1"))
    _plan_variant(w, "unknown_layer", plan, assignment={**plan["assignment"], "model.layers.9.mlp.up_proj": "s0.3"})
    _plan_variant(w, "off_grid", plan, assignment=dict.fromkeys(plan["assignment"], "s0.35"))
    _plan_variant(w, "bad_level", plan, grid=["s7"], assignment=dict.fromkeys(plan["assignment"], "s7"))
    _plan_variant(w, "bad_budget", plan, budget={"kind": "sparsity", "value": 3})
    _plan_variant(w, "missing_keys", {"schema_version": 1, "model": {}})
    other = {**plan, "model": {**plan["model"], "fingerprint": "0" * 16}}
    _plan_variant(w, "other_model", other)
    schema1 = {k: v for k, v in plan.items() if k != "backend"} | {"schema_version": 1}  # settings beside it
    _plan_variant(w, "corrupt_config", schema1)
    (w["corrupt_config"].parent / "config.json").write_text("{not json")
    for name in ("nomodel_dir", "corrupt_model_dir", "empty_dir", "nonempty_dir", "report_corrupt", "report_empty"):
        w[name] = root / name
        w[name].mkdir()
    (w["corrupt_model_dir"] / "config.json").write_text("{broken")
    (w["nonempty_dir"] / "keep.txt").write_text("mine")
    for name, change in (("huge_model", {"hidden_size": 2**16, "intermediate_size": 2**18, "num_hidden_layers": 4096}),
                         ("negative_model", {"hidden_size": -64})):  # fmt: skip
        shutil.copytree(w["model"], root / name)
        config = json.loads((root / name / "config.json").read_text())
        (root / name / "config.json").write_text(json.dumps({**config, **change}))
        w[name] = root / name
    (w["report_corrupt"] / "run1").mkdir()
    (w["report_corrupt"] / "run1" / "plan.json").write_text('{"schema_version": 1')
    (w["report_corrupt"] / "run1" / "metrics.json").write_text("{}")
    _tables(w)


def _plan_variant(w: W, name: str, plan: dict, **changes) -> None:
    folder = w["root"] / name
    folder.mkdir()
    (folder / "plan.json").write_text(json.dumps({**plan, **changes}))
    config = w["plan"].parent / "config.json"
    (folder / "config.json").write_text(config.read_text())
    w[name] = folder / "plan.json"


def _tables(w: W) -> None:
    """A good latency table of the tiny model (measured on CPU), and damaged copies of it."""
    from allocator.inventory import Inventory
    from allocator.latency.measure import Timer, measure_table

    model = tiny_model("llama")
    env = {"gpu": "cpu", "driver": "none", "torch": "x"}
    timer = Timer("cpu", repeats=2, warmup=1)
    inventory = Inventory.from_model(model)
    table = measure_table(model, inventory, (1, 8), ("dense",), timer, env, {"model": str(w["model"])})
    root = w["root"] / "tables"
    root.mkdir()
    table.save(root / "good.csv")
    w["table"] = root / "good.csv"
    variants = {
        "sidecar": lambda df: (df, "{broken"),
        "nonnumber": lambda df: (df.astype({"ms": object}).assign(ms=["fast"] * len(df)), None),
        "nocolumns": lambda df: (df.drop(columns=["ms"]), None),
        "negative": lambda df: (df.assign(ms=-1.0), None),
        "infinite": lambda df: (df.assign(ms=float("inf")), None),
        "conflicting": lambda df: (pd.concat([df, df.assign(ms=df["ms"] * 2)]), None),
    }
    for name, change in variants.items():
        df, side = change(table.df.copy())
        df.to_csv(root / f"{name}.csv", index=False)
        (root / f"{name}.json").write_text(side if side is not None else json.dumps(table.meta))
        w[f"table_{name}"] = root / f"{name}.csv"
    pd.DataFrame({"a": [1]}).to_csv(root / "empty_rows.csv", index=False)
    w["table_foreign"] = root / "empty_rows.csv"


def _run(w: W, out: Path | str, *extra: str) -> list[str]:
    return ["run", "--model", str(w["model"]), "--calib", str(w["calib"]), "--eval", str(w["eval"]),
            "--seq-len", "16", "--calib-samples", "2", "--kl-samples", "2", "--eval-samples", "4",
            "--cache-dir", str(w["profiles"]), "-o", str(out), *extra]  # fmt: skip


def run(*extra: str) -> Callable[[W], list[str]]:
    """A ``run`` of the tiny model into a new folder, with ``extra`` flags (``{name}`` -> a world path)."""
    return lambda w: _run(w, w["root"] / "out", *(_fill(a, w) for a in extra))


def cmd(*argv: str) -> Callable[[W], list[str]]:
    """Any verb, with ``{name}`` -> a world path."""
    return lambda w: [_fill(a, w) for a in argv]


def _fill(arg: str, w: W) -> str:
    return arg.format(**{k: str(v) for k, v in w.items()}) if "{" in arg else arg


CASES: dict[str, Case] = {
    # ---- counts and numbers --------------------------------------------------------------------------
    "seq-len not a number": Case(run("--seq-len", "abc"), "invalid int value"),
    "seq-len 0": Case(run("--seq-len", "0"), "--seq-len must be at least 1"),
    "seq-len 1": Case(run("--seq-len", "1"), "--seq-len must be at least 2"),
    "batch-size 0": Case(run("--batch-size", "0"), "--batch-size must be at least 1"),
    "batch-size negative": Case(run("--batch-size", "-3"), "--batch-size must be at least 1"),
    "calib-samples 0": Case(run("--calib-samples", "0"), "--calib-samples must be at least 1"),
    "kl-samples 0": Case(run("--kl-samples", "0"), "--kl-samples must be at least 1"),
    "eval-samples 0": Case(run("--eval-samples", "0"), "--eval-samples must be at least 1"),
    "eval-samples word": Case(run("--eval-samples", "many"), "invalid _samples value"),
    "eval-samples too many": Case(run("--eval-samples", "100000"), "ask for at most"),
    "calib-samples too many for the text": Case(run("--calib", "{short_txt}"), "calibration documents longer"),
    "generations -2": Case(run("--method", "evolution", "--generations", "-2"), "--generations must be at least 1"),
    "offspring 0": Case(run("--method", "evolution", "--offspring", "0"), "--offspring must be at least 1"),
    "trials 0": Case(run("--method", "optuna", "--trials", "0"), "--trials must be at least 1"),
    "fit-seqs 0": Case(run("--fit-seqs", "0"), "--fit-seqs must be at least 1"),
    "fit-plans negative": Case(run("--method", "knapsack", "--fit-plans", "-1"), "--fit-plans must be at least 1"),
    "fit-rounds negative": Case(run("--method", "knapsack", "--fit-rounds", "-1"), "--fit-rounds must be at least 0"),
    "lam negative": Case(run("--method", "owl", "--lam", "-0.1"), "--lam must be"),
    "time-limit 0": Case(run("--method", "knapsack", "--time-limit", "0"), "--time-limit must be > 0"),
    "latency-tokens 0": Case(run("--latency-tokens", "0"), "--latency-tokens must be at least 1"),
    "seed not a number": Case(run("--seed", "x"), "invalid int value"),
    # ---- budgets -------------------------------------------------------------------------------------
    "sparsity 1.0": Case(run("--target", "sparsity=1.0"), "[0, 1)"),
    "sparsity negative": Case(run("--target", "sparsity=-0.2"), "[0, 1)"),
    "sparsity not a number": Case(run("--target", "sparsity=abc"), "sparsity"),
    "unknown budget kind": Case(run("--target", "speed=2"), "unknown budget"),
    "budget without value": Case(run("--target", "sparsity"), "KIND=VALUE"),
    "bits 0": Case(run("--target", "bits=0"), "bits"),
    "speedup below 1": Case(run("--target", "speedup=0.5", "--latency-table", "{table}"), "speedup must be >= 1"),
    "latency budget without table": Case(run("--target", "latency=1"), "--latency-table"),
    "budget repeated": Case(run("--target", "sparsity=0.5,sparsity=0.6"), "twice"),
    # ---- grids ---------------------------------------------------------------------------------------
    "range not numbers": Case(run("--levels", "0:x:0.1"), "START:STOP:STEP as numbers"),
    "range nan step": Case(run("--levels", "0:0.9:nan"), "step > 0"),
    "range too fine": Case(run("--levels", "0:0.9:1e-9"), "use a larger step"),
    "sparsity level 2": Case(run("--levels", "s2"), "sparsity must be in"),
    "bits level 99": Case(run("--levels", "dense,w99"), "w99"),
    "level garbage": Case(run("--levels", "dense,banana"), "banana"),
    "empty grid": Case(run("--levels", ","), "level"),
    "N:M with N > M": Case(run("--levels", "dense,5:4"), "5:4"),
    # ---- choices -------------------------------------------------------------------------------------
    "unknown backend": Case(run("--backend", "magic"), "magic"),
    "unknown method": Case(run("--method", "magic"), "unknown method"),
    "unknown per": Case(run("--per", "block"), "invalid choice"),
    "unknown sensitivity": Case(run("--sensitivity", "vibes"), "invalid choice"),
    "unknown dtype": Case(run("--dtype", "float64"), "--dtype"),
    "unknown device": Case(run("--device", "tpu"), "--device"),
    "stages garbage": Case(run("--method", "evolution", "--stages", "lots"), "bad selection stages"),
    "stages zero survivors": Case(run("--method", "evolution", "--stages", "0@16,1@32"), "positive numbers"),
    "objectives latency without table": Case(
        run("--method", "optuna", "--objectives", "fitness,latency"), "--latency-table"
    ),  # fmt: skip
    "optuna storage scheme": Case(run("--method", "optuna", "--storage", "foo://bar"), "cannot open optuna storage"),
    # ---- model ---------------------------------------------------------------------------------------
    "model folder missing": Case(run("--model", "{root}/nope"), "not a Hugging Face model folder"),
    "model folder without config": Case(run("--model", "{nomodel_dir}"), "no config.json"),
    "model config corrupt": Case(run("--model", "{corrupt_model_dir}"), "cannot load model"),
    "model config of a trillion parameters": Case(run("--model", "{huge_model}"), "GB of memory free"),
    "model config with a negative width": Case(run("--model", "{negative_model}"), "does not describe a model"),
    "gguf missing": Case(run("--model", "{root}/missing.gguf"), "does not exist"),
    "gguf truncated": Case(run("--model", "{truncated_gguf}"), "GGUF"),
    "gguf not a gguf": Case(run("--model", "{text_gguf}"), "not a GGUF file"),
    "hub id offline": Case(run("--model", "someorg/somemodel"), "cannot load model"),
    # ---- data ----------------------------------------------------------------------------------------
    "calib missing": Case(run("--calib", "{root}/missing.txt"), "does not exist"),
    "eval missing": Case(run("--eval", "{root}/missing.txt"), "does not exist"),
    "calib binary": Case(run("--calib", "{binary}"), "not UTF-8 text"),
    "calib NUL bytes": Case(run("--calib", "{nul_txt}"), "NUL bytes"),
    "calib corrupt parquet": Case(run("--calib", "{broken_parquet}"), "not a readable Parquet file"),
    "calib empty": Case(run("--calib", "{empty_txt}"), "is empty"),
    "eval blank lines only": Case(run("--eval", "{blank_txt}"), "is empty"),
    "calib folder without txt": Case(run("--calib", "{empty_dir}"), "holds no .txt"),
    "dataset name offline": Case(run("--calib", "someorg/somedata"), "cannot load dataset"),
    # ---- outputs -------------------------------------------------------------------------------------
    "output is a file": Case(run("-o", "{afile}"), "is a file"),
    "output under a file": Case(run("-o", "{afile}/sub"), "is a file"),
    "profile output is a folder": Case(
        cmd(
            "profile",
            "--model",
            "{model}",
            "--calib",
            "{calib}",
            "--eval",
            "{eval}",
            "--seq-len",
            "16",
            "-o",
            "{empty_dir}",
        ),
        "is a folder",
    ),  # fmt: skip
    "profile kl-pool negative": Case(cmd("profile", "--model", "{model}", "--kl-pool", "-1"), "--kl-pool"),
    # ---- plans ---------------------------------------------------------------------------------------
    "plan missing": Case(run("--plan", "{root}/missing.json"), "does not exist"),
    "plan not JSON": Case(run("--plan", "{notjson_json}"), "not valid JSON"),
    "plan a list": Case(run("--plan", "{list_json}"), "not an allocator plan"),
    "plan old schema": Case(run("--plan", "{old_schema}"), "schema_version"),
    "plan missing keys": Case(run("--plan", "{missing_keys}"), "malformed plan"),
    "plan over budget": Case(run("--plan", "{over_budget}"), "breaks its budget"),
    "plan unknown layer": Case(run("--plan", "{unknown_layer}"), "layers of assignment and model.shapes differ"),
    "plan level off grid": Case(run("--plan", "{off_grid}"), "outside the plan's grid"),
    "plan bad level": Case(run("--plan", "{bad_level}"), "sparsity must be in"),
    "plan bad budget": Case(run("--plan", "{bad_budget}"), "[0, 1)"),
    "plan for another model": Case(run("--plan", "{other_model}"), "another model"),
    "profile file missing": Case(run("--method", "knapsack", "--profile", "{root}/missing.parquet"), "does not exist"),
    "profile file corrupt": Case(run("--method", "knapsack", "--profile", "{broken_parquet}"), "profile"),
    # ---- apply / export / report ---------------------------------------------------------------------
    "apply plan missing": Case(cmd("apply", "{root}/missing.json", "-o", "{root}/ckpt"), "does not exist"),
    "apply corrupt config": Case(cmd("apply", "{corrupt_config}", "-o", "{root}/ckpt"), "is corrupt"),
    "apply over budget": Case(cmd("apply", "{over_budget}", "-o", "{root}/ckpt"), "breaks its budget"),
    "apply into a non-empty folder": Case(cmd("apply", "{plan}", "-o", "{nonempty_dir}"), "not empty"),
    "apply into a file": Case(cmd("apply", "{plan}", "-o", "{afile}"), "is a file"),
    "apply batch-size 0": Case(cmd("apply", "{plan}", "-o", "{root}/ckpt", "--batch-size", "0"), "--batch-size"),
    "apply without output": Case(cmd("apply", "{plan}"), "required"),
    "export unknown format": Case(cmd("export", "{plan}", "--to", "onnx"), "invalid choice"),
    "export plan missing": Case(cmd("export", "{root}/missing.json", "--to", "json"), "does not exist"),
    "export corrupt plan": Case(cmd("export", "{notjson_json}", "--to", "json"), "not valid JSON"),
    "export over budget": Case(cmd("export", "{over_budget}", "--to", "json", "-o", "{root}/x"), "breaks its budget"),
    "export sparsity to llama.cpp": Case(cmd("export", "{plan}", "--to", "llamacpp", "-o", "{root}/x"), "llama.cpp"),
    "export into a file": Case(cmd("export", "{plan}", "--to", "json", "-o", "{afile}"), "is a file"),
    "report missing folder": Case(cmd("report", "{root}/nope"), "does not exist"),
    "report folder without runs": Case(cmd("report", "{report_empty}"), "no run"),
    "report with a corrupt plan": Case(cmd("report", "{report_corrupt}"), "not valid JSON"),
    "compare unknown method": Case(cmd("compare", "--methods", "magic", "-o", "{root}/c"), "unknown method"),
    "compare unknown method option": Case(cmd("compare", "--methods", "owl:gens=3", "-o", "{root}/c"), "OPTION=VALUE"),
    "compare bad method option value": Case(
        cmd("compare", "--methods", "owl:lam=x", "-o", "{root}/c"), "takes a float"
    ),
    "run evolution bad start": Case(cmd("run", "--method", "evolution", "--start", "owl"), "--start"),
    "compare bad target": Case(cmd("compare", "--targets", "sparsity=2", "-o", "{root}/c"), "[0, 1)"),
    "compare bootstrap 0": Case(cmd("compare", "--bootstrap", "0", "-o", "{root}/c"), "--bootstrap"),
    "compare output is a file": Case(cmd("compare", "--model", "{model}", "-o", "{afile}"), "is a file"),
    # ---- latency -------------------------------------------------------------------------------------
    "latency measure tokens 0": Case(cmd("latency", "measure", "--device", "cpu", "--tokens", "0,8"), "--tokens"),
    "latency measure tokens word": Case(cmd("latency", "measure", "--tokens", "a,b"), "--tokens"),
    "latency measure repeats 0": Case(cmd("latency", "measure", "--device", "cpu", "--repeats", "0"), "--repeats"),
    "latency measure unknown kernel": Case(
        cmd("latency", "measure", "--device", "cpu", "--kernels", "warp"), "unknown kernels"
    ),  # fmt: skip
    "latency measure unknown model": Case(
        cmd("latency", "measure", "--device", "cpu", "--model", "{root}/nope"), "cannot read a model config"
    ),  # fmt: skip
    "latency measure out under a file": Case(
        cmd("latency", "measure", "--device", "cpu", "--model", "{model}", "--out", "{afile}/t"), "is a file"
    ),  # fmt: skip
    "latency table missing": Case(cmd("latency", "predict", "{plan}", "--table", "{root}/nope.csv"), "does not exist"),
    "latency table not CSV": Case(cmd("latency", "predict", "{plan}", "--table", "{bad_csv}"), "latency table"),
    "latency table corrupt sidecar": Case(
        cmd("latency", "predict", "{plan}", "--table", "{table_sidecar}"), "sidecar"
    ),  # fmt: skip
    "latency table non-number": Case(
        cmd("latency", "predict", "{plan}", "--table", "{table_nonnumber}"), "not a number"
    ),  # fmt: skip
    "latency table lacks a column": Case(
        cmd("latency", "predict", "{plan}", "--table", "{table_nocolumns}"), "lacks columns"
    ),  # fmt: skip
    "latency table infinite": Case(cmd("latency", "predict", "{plan}", "--table", "{table_infinite}"), "infinite"),
    "latency table conflicting duplicates": Case(
        cmd("latency", "predict", "{plan}", "--table", "{table_conflicting}"), "twice with different times"
    ),  # fmt: skip
    "latency table negative times": Case(
        cmd("latency", "predict", "{plan}", "--table", "{table_negative}"), "negative"
    ),  # fmt: skip
    "latency table of another kind": Case(
        cmd("latency", "predict", "{plan}", "--table", "{table_foreign}"), "lacks columns"
    ),  # fmt: skip
    "latency tokens out of range": Case(
        cmd("latency", "predict", "{plan}", "--table", "{table}", "--tokens", "4096"), "outside the measured range"
    ),  # fmt: skip
    "latency predict plan missing": Case(
        cmd("latency", "predict", "{root}/nope.json", "--table", "{table}"), "does not exist"
    ),  # fmt: skip
    "run with corrupt latency table": Case(
        run("--target", "speedup=1.2", "--latency-table", "{table_sidecar}"), "sidecar"
    ),  # fmt: skip
}


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_there_are_at_least_70_cases():
    assert len(CASES) >= 70


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(name, world, capsys, monkeypatch):
    if name == "output under a file" and os.name != "posix":
        pytest.skip("posix paths")
    monkeypatch.chdir(world["cwd"])
    monkeypatch.setenv("ALLOCATOR_CACHE", str(world["cache"]))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # an unreachable hub, online or not
    hub_reachable.cache_clear()
    case = CASES[name]
    before = _tree(world["root"])
    capsys.readouterr()
    try:
        code = main(case.argv(world))
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ") or ": error: " in line]
    assert code == 2, (code, lines[-3:])
    assert "Traceback" not in err
    assert len(errors) == 1 and lines[-1] == errors[0], lines[-5:]
    assert case.match in errors[0], errors[0]
    assert _tree(world["root"]) == before, f"left behind: {sorted(_tree(world['root']) - before)}"


def test_cuda_without_a_gpu_is_refused(world, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(_run(world, world["root"] / "cuda", "--device", "cuda")) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
