"""Plans and run folders are files people share: hostile names, texts and numbers are refused in one line where the
file is read, every export is produced by its serialiser and parses back to the plan's names only, no export goes
through a planted symbolic link, and a seeded fuzzer finds no other outcome than "one line, exit 2, nothing written"
or a well-formed export."""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from allocator.cli import main
from allocator.errors import AllocatorError
from allocator.export import EXPORTERS
from allocator.io import write_json_atomic
from allocator.plan import Plan
from allocator.report import write_run_report
from allocator.untrusted import cell
from tests.test_export import make_plan

HOSTILE_NAMES = ["re:.*", "model.layers.0.self_attn.q_proj\nquant_stage: {}", 'x,=HYPERLINK("http://e")',
                 "<script>alert(1)</script>", "../../etc/passwd", "model.layers.0.mlp.down_proj$|.*", "a b", "",
                 "model.layers.0.mlp..down_proj", "model.layers.0.mlp.down_proj\x00"]  # fmt: skip
DEEP: dict = {}
_inner = DEEP
for _ in range(20):
    _inner["x"] = {}
    _inner = _inner["x"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quiet():
    logging.disable(logging.WARNING)  # exporters warn of llama.cpp fallbacks: not what these tests look at
    yield
    logging.disable(logging.NOTSET)


def plan_dict(grid: str = "dense,w8,w4g32", seed: int = 0) -> dict:
    return make_plan(grid, seed).to_dict()


def rename(data: dict, old: str, new: str) -> dict:
    """``data`` with layer ``old`` called ``new`` everywhere a layer name is a key."""
    data = copy.deepcopy(data)
    for table in (data["assignment"], data["model"]["shapes"], data["model"]["layers"]):
        table[new] = table.pop(old)
    return data


def one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text and len(text) < 2000
    return text


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_layer_name_that_is_not_a_module_name_is_refused_naming_it(name):
    data = plan_dict()
    data = rename(data, next(iter(data["assignment"])), name)
    with pytest.raises(AllocatorError, match="not module names") as refused:
        Plan.from_dict(data, source="shared/plan.json")
    assert repr(name)[:60] in one_line(refused.value) and "shared/plan.json" in str(refused.value)


def test_a_plan_built_in_code_is_checked_too():
    plan = make_plan("dense,w8", 0)
    assignment = {**plan.assignment, "re:.*": plan.assignment[next(iter(plan.assignment))]}
    with pytest.raises(AllocatorError, match="not module names"):
        Plan(**{**plan.__dict__, "assignment": assignment})


@pytest.mark.parametrize(("path", "value", "message"), [
    (("model", "id"), "tiny\nquant_stage: {evil: 1}", "model.id must be one line"),
    (("method",), "knapsack\r\n- x", "method must be one line"),
    (("budget", "value"), "inf", "finite"),
    (("budget", "value"), 1e999, "finite"),
    (("seed",), "3", "seed must be an integer"),
    (("seed",), 2.5, "seed must be an integer"),
    (("achieved", "bits"), float("nan"), "finite"),
    (("timings", "search"), float("inf"), "finite"),
    (("data",), DEEP, "nests deeper"),
    (("model", "shapes", "model.layers.0.mlp.down_proj"), [64, -1], "shapes"),
    (("model", "shapes", "model.layers.0.mlp.down_proj"), "ab", "shapes"),
])  # fmt: skip
def test_texts_and_numbers_of_a_plan_are_checked_naming_the_field(path, value, message):
    data = plan_dict()
    where = data
    for key in path[:-1]:
        where = where[key]
    where[path[-1]] = value
    with pytest.raises(AllocatorError, match=message) as refused:
        Plan.from_dict(json.loads(json.dumps(data)))
    one_line(refused.value)


def test_a_budget_of_infinity_is_refused_at_the_command_line(tiny_model_dir, text_files, tmp_path, capsys):
    argv = ["run", "--model", str(tiny_model_dir), "--calib", str(text_files["calib"]), "--target", "bits=inf",
            "-o", str(tmp_path / "run")]  # fmt: skip
    assert main(argv) == 2
    assert "finite" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_json_we_write_is_strict(tmp_path):
    write_json_atomic(tmp_path / "m.json", {"perplexity": float("inf"), "kl": [float("nan"), 1.5]})

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=refuse) == {"perplexity": None,
                                                                                     "kl": [None, 1.5]}  # fmt: skip


@pytest.mark.parametrize("fmt", sorted(EXPORTERS))
def test_every_export_parses_back_to_the_plans_names_only(fmt):
    """Each file is read with its own syntax's parser: what it names is exactly the plan's layers."""
    plan = make_plan("dense,w8,w4g32", 3)
    files = EXPORTERS[fmt](plan, None)
    layers = set(plan.assignment)
    for name, text in files.items():
        if name.endswith(".yaml"):
            recipe = yaml.safe_load(text)
            assert set(recipe) <= {"sparsity_stage", "quant_stage"}
            groups = recipe["quant_stage"]["quant_modifiers"]["GPTQModifier"]["config_groups"]
            patterns = [p.removeprefix("re:") for g in groups.values() for p in g["targets"]]
            assert {n for n in layers if any(re.fullmatch(p, n) for p in patterns)} == {
                n for n, lv in plan.assignment.items() if lv.quantized}  # fmt: skip
        elif name.endswith(".csv"):
            rows = list(csv.reader(io.StringIO(text)))
            assert len(rows) == len(layers) + 1 and {r[0] for r in rows[1:]} == layers
        elif name.endswith(".json"):
            json.loads(text, parse_constant=lambda c: pytest.fail(f"constant {c}"))
        elif name == "tensor-types.txt":
            assert all(re.fullmatch(r"\^[\w\\.]+\$=\w+", line) for line in text.splitlines())


def test_csv_cells_a_spreadsheet_would_run_are_defused():
    assert [cell(v) for v in ("=1+1", "+1", "-1", "@SUM(A1)", "model.layers.0", 3.5)] == [
        "'=1+1", "'+1", "'-1", "'@SUM(A1)", "model.layers.0", 3.5]  # fmt: skip


def test_an_export_never_goes_through_a_planted_link(tmp_path, capsys):
    shared, elsewhere = tmp_path / "shared_run", tmp_path / "elsewhere"
    shared.mkdir(), elsewhere.mkdir()
    make_plan("dense,w8", 0).save(shared / "plan.json")
    (shared / "exports").symlink_to(elsewhere, target_is_directory=True)
    assert main(["export", str(shared / "plan.json"), "--to", "json"]) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and err.count("\n") == 1 and not any(elsewhere.iterdir())


def test_a_run_never_overwrites_the_plan_it_reads(tiny_model_dir, text_files, tmp_path, capsys):
    run = tmp_path / "run"
    base = ["--model", str(tiny_model_dir), "--calib", str(text_files["calib"]), "--eval", str(text_files["eval"]),
            "--backend", "magnitude", "--seq-len", "16", "--calib-samples", "2", "--eval-samples", "2",
            "--kl-samples", "2", "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    assert main(["run", *base, "--target", "sparsity=0.5", "--method", "uniform", "-o", str(run)]) == 0
    before = (run / "plan.json").read_bytes()
    assert main(["run", *base, "--plan", str(run / "plan.json"), "-o", str(run)]) == 2
    assert "would be overwritten" in capsys.readouterr().err and (run / "plan.json").read_bytes() == before


def test_text_from_a_shared_run_is_inert_in_the_report(tmp_path):
    plan = make_plan("dense,w8", 0)
    hostile = Plan(**{**plan.__dict__, "method": '<img src=x onerror="alert(1)">|[link](javascript:x)'})
    run = tmp_path / "<b>run"
    hostile.save(run / "plan.json")
    report = write_run_report(run).read_text()
    assert "<img" not in report and "<b>" not in report and "&lt;img" in report and "[link](" not in report


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    from allocator.cli import verbs

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(verbs, "report", interrupted)
    assert main(["report", "anything"]) == 130
    err = capsys.readouterr().err
    assert err.startswith("interrupted") and err.count("\n") == 1


def test_a_closed_stdout_pipe_ends_quietly(tmp_path):
    script = ("import sys; from allocator.cli import main, verbs\n"
              "def many(args):\n    for i in range(200000): print('line', i)\n    return 0\n"
              "verbs.report = many\nsys.exit(main(['report', 'x']))\n")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})  # fmt: skip
    proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and "Traceback" not in err and "Error" not in err


# ---- the fuzzer: mutated plans through load -> check -> export


def _mutations(rng: np.random.Generator) -> list:
    return [None, "", "x\ny", "re:.*", -1, 10**30, 1e308 * 10, float("nan"), [], {}, "=1+1", True, [1, 2, 3],
            {"a": [1]}, "model.layers.0.mlp.down_proj", "w4g32", "dense", 0.5, int(rng.integers(-5, 5))]  # fmt: skip


def _paths(tree, prefix=()):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield (*prefix, i)
            yield from _paths(value, (*prefix, i))


def mutate(data: dict, rng: np.random.Generator) -> dict:
    """One to three edits: a value replaced, a key deleted or renamed to something hostile."""
    data = copy.deepcopy(data)
    for _ in range(int(rng.integers(1, 4))):
        paths = list(_paths(data))
        path = paths[int(rng.integers(len(paths)))]
        parent = data
        for key in path[:-1]:
            parent = parent[key]
        choice = rng.integers(3)
        options = _mutations(rng)
        if choice == 0 or isinstance(parent, list):
            parent[path[-1]] = options[int(rng.integers(len(options)))]
        elif choice == 1:
            del parent[path[-1]]
        else:
            parent[str(options[int(rng.integers(len(options)))])] = parent.pop(path[-1])
    return data


def test_fuzzed_plans_end_in_one_line_or_a_well_formed_export():
    """2,000 mutated plans: reading refuses in one AllocatorError line or the plan exports (and parses back) with
    every exporter; any other exception fails."""
    rng = np.random.default_rng(2026)
    bases = [plan_dict("dense,w8,w4g32", 0), plan_dict("s0.5,dense,w4g32", 1)]
    outcomes = {"refused on read": 0, "refused by an exporter": 0, "exported": 0}
    for i in range(2000):
        data = mutate(bases[i % 2], rng)
        try:
            plan = Plan.from_dict(json.loads(json.dumps(data)))
        except AllocatorError as exc:
            one_line(exc)
            outcomes["refused on read"] += 1
            continue
        for exporter in EXPORTERS.values():
            try:
                files = exporter(plan, None)
            except AllocatorError as exc:
                one_line(exc)
                outcomes["refused by an exporter"] += 1
                continue
            outcomes["exported"] += 1
            for name, text in files.items():
                if name.endswith(".json"):
                    json.loads(text, parse_constant=lambda c: pytest.fail(f"constant {c}"))
                elif name.endswith(".yaml"):
                    assert isinstance(yaml.safe_load(text), dict)
    assert all(outcomes.values()), outcomes  # the mutator reaches every outcome


def test_fuzzed_plans_through_the_command_line_write_nothing_when_refused(tmp_path, capsys):
    rng = np.random.default_rng(7)
    base = plan_dict()
    refused = 0
    for i in range(60):
        folder = tmp_path / f"p{i}"
        folder.mkdir()
        (folder / "plan.json").write_text(json.dumps(mutate(base, rng)))
        code = main(["export", str(folder / "plan.json"), "--to", ("json", "csv", "llmcompressor")[i % 3]])
        err = capsys.readouterr().err
        if code == 2:
            refused += 1
            assert err.startswith("error: ") and err.count("\n") == 1 and not (folder / "exports").exists()
        else:
            assert code == 0 and any((folder / "exports").rglob("*.*"))
    assert 0 < refused < 60


def test_a_real_sigint_ends_in_one_line_exit_130_and_resume_gives_the_straight_plan(tiny_model_dir, text_files,
                                                                                    tmp_path):  # fmt: skip
    """Ctrl-C as a terminal sends it (SIGINT to the process) mid-evolution: one line, exit 130, no plan written;
    ``--resume`` in the same folder ends at the plan of a run never interrupted."""
    import signal
    import subprocess
    import sys
    import time

    from tests.test_cli import _args

    def argv(out):
        search = ["--method", "evolution", "--generations", "60", "--offspring", "4", "--stages", "1@32"]
        return _args(tiny_model_dir, text_files, out, *search, "--target", "sparsity=0.5", "--cache-dir",
                     str(tmp_path / "c"))  # fmt: skip

    assert main(argv(tmp_path / "straight")) == 0
    killed = tmp_path / "killed"
    root = Path(__file__).resolve().parents[1]
    # a shell's background job (`cmd &`) ignores SIGINT, and Python keeps an ignored SIGINT ignored: the worker
    # takes Ctrl-C as a terminal's foreground process does, whatever started the tests
    worker = subprocess.Popen([sys.executable, "-m", "allocator.cli", *argv(killed)], cwd=root, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    state = killed / "evolution_state.json"
    deadline = time.time() + 300
    while time.time() < deadline and worker.poll() is None:
        time.sleep(0.02)
        if state.is_file() and json.loads(state.read_text())["generation"] >= 2:
            break
    assert worker.poll() is None, "the run ended before the interrupt"
    worker.send_signal(signal.SIGINT)
    _, err = worker.communicate(timeout=120)
    assert worker.returncode == 130
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line and "s/it]" not in line]
    assert lines[-1].startswith("interrupted") and "Traceback" not in err
    assert not (killed / "plan.json").exists() and not list(killed.glob("*.tmp*"))
    assert main([*argv(killed), "--resume"]) == 0
    straight = json.loads((tmp_path / "straight" / "plan.json").read_text())["assignment"]
    assert json.loads((killed / "plan.json").read_text())["assignment"] == straight
