"""Downstream accuracy (``--tasks``): the plan's model in memory through lm-evaluation-harness, on a local task.

The task is lm-eval's own YAML over a JSONL the test writes, so its real plumbing runs offline; the accuracy it
reports is checked against the same multiple-choice rule computed here by hand on the same compressed weights.
"""

from __future__ import annotations

import json
import random
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from allocator.apply import plan_config
from allocator.cli import main
from allocator.evaluate import bootstrap_mean
from allocator.plan import Plan
from allocator.session import Session
from tests.conftest import WORDS

pytest.importorskip("lm_eval")


def _local_task(folder, n: int = 24, name: str = "allocator_local_choice", seed: int = 0) -> tuple:
    """A multiple-choice task in lm-eval's YAML over a JSONL: a few words, which word comes next."""
    rng = random.Random(seed)
    words = list(dict.fromkeys(WORDS))
    items = [{"question": " ".join(rng.choice(words) for _ in range(5)), "choices": rng.sample(words, 3),
              "answer": i % 3} for i in range(n)]  # fmt: skip
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    yaml_file = folder / f"{name}.yaml"
    yaml_file.write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / f"{name}.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return yaml_file, items


@torch.no_grad()
def _accuracy_by_hand(model, tokenizer, items) -> float:
    """lm-eval's multiple-choice rule: the choice whose tokens (after a space) have the largest summed log-prob."""
    right = 0
    for item in items:
        context = tokenizer(item["question"], add_special_tokens=False).input_ids
        scores = []
        for choice in item["choices"]:
            whole = tokenizer(item["question"] + " " + choice, add_special_tokens=False).input_ids
            ids = torch.tensor([whole])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            cont = range(len(context), len(whole))
            scores.append(sum(logp[t - 1, whole[t]].item() for t in cont))
        right += int(np.argmax(scores) == item["answer"])
    return right / len(items)


def test_compare_scores_a_local_lm_eval_task_beside_perplexity(tiny_model_dir, text_files, tmp_path, capsys):
    yaml_file, items = _local_task(tmp_path / "task")
    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(tiny_model_dir), "--calib", str(text_files["calib"]), "--texts",
            str(text_files["eval"]), "--methods", "uniform,knapsack", "--targets", "sparsity=0.6", "--sensitivity",
            "fisher", "--seq-len", "16", "--calib-samples", "2", "--kl-samples", "2", "--eval-samples", "6",
            "--tasks", str(yaml_file), "--cache-dir", str(tmp_path / "c"), "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "allocator_local_choice" in printed and "tasks.csv" in printed
    scores = pd.read_csv(out / "tasks.csv")
    assert set(scores.method) == {"uniform", "knapsack"} and set(scores.metric) == {"acc"}
    assert ((scores.lo <= scores.value) & (scores.value <= scores.hi)).all() and (scores["items"] == len(items)).all()
    assert "## lm-eval allocator_local_choice: acc" in (out / "compare.md").read_text()
    dense = json.loads((out / "dense" / "eval.json").read_text())["tasks"]["allocator_local_choice"]
    for method in ("uniform", "knapsack"):  # each plan's accuracy is its compressed model's, computed by hand
        cell = out / "sparsity=0.6" / method
        plan = Plan.load(cell / "plan.json")
        session = Session(plan_config(cell / "plan.json", plan, {}))
        by_hand_dense = _accuracy_by_hand(session.model, session.loaded.tokenizer, items)
        assert dense["metrics"]["acc"]["value"] == pytest.approx(by_hand_dense, abs=1e-12)
        session.compress_(plan.assignment, plan.backend["name"])
        reported = json.loads((cell / "metrics.json").read_text())["tasks"]["allocator_local_choice"]
        by_hand = _accuracy_by_hand(session.model, session.loaded.tokenizer, items)
        assert reported["metrics"]["acc"]["value"] == pytest.approx(by_hand, abs=1e-12)
        assert scores[scores.method == method].dense.iloc[0] == pytest.approx(by_hand_dense, abs=1e-12)


def test_run_prints_the_task_accuracy_and_limits_items(tiny_model_dir, text_files, tmp_path, capsys):
    yaml_file, _ = _local_task(tmp_path / "task")
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--calib", str(text_files["calib"]), "--eval",
            str(text_files["eval"]), "--seq-len", "16", "--calib-samples", "2", "--kl-samples", "2", "--eval-samples",
            "4", "--tasks", str(yaml_file), "--tasks-limit", "10", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert "allocator_local_choice" in capsys.readouterr().out
    tasks = json.loads((out / "metrics.json").read_text())["tasks"]["allocator_local_choice"]
    assert tasks["items"] == 10 and tasks["limit"] == 10
    assert json.loads((out / "config.json").read_text())["tasks"] == str(yaml_file)


@pytest.mark.parametrize(
    ("tasks", "extra", "message"),
    [
        ("missing.yaml", [], "does not exist"),
        ("", [], "--tasks is empty"),
        ("notask.yaml", [], "not an lm-eval task file"),
        ("ok", ["--tasks-limit", "0"], "--tasks-limit must be at least 1"),
    ],
)
def test_bad_tasks_are_refused_before_any_work(tasks, extra, message, tiny_model_dir, text_files, tmp_path, capsys,
                                               monkeypatch):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notask.yaml").write_text("dataset_path: json\n")
    argv = ["run", "--model", str(tiny_model_dir), "--calib", str(text_files["calib"]), "--tasks", tasks, *extra,
            "-o", str(tmp_path / "out")]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_tasks_without_lm_eval_name_the_extra(tiny_model_dir, text_files, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    argv = ["run", "--model", str(tiny_model_dir), "--tasks", "arc_easy", "-o", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "pip install 'allocator[eval]'" in capsys.readouterr().err


def test_bootstrap_mean_of_item_scores_matches_the_normal_interval():
    scores = np.random.default_rng(1).integers(0, 2, 2000).astype(float)
    mean, lo, hi = bootstrap_mean(scores, samples=4000)
    half = 1.96 * scores.std() / np.sqrt(len(scores))
    assert mean == scores.mean() and lo < mean < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert bootstrap_mean(scores) == bootstrap_mean(scores)  # seeded


def test_a_group_of_tasks_reports_each_subtask(tiny_model_dir, text_files, tmp_path):
    """A group (as ``mmlu`` is one) runs its tasks one by one: each is scored on its own."""
    folder = tmp_path / "task"
    for i, name in enumerate(("allocator_part_a", "allocator_part_b")):
        _local_task(folder, n=8 + 4 * i, name=name, seed=i)
    group = folder / "group.yaml"
    group.write_text("group: allocator_both\ntask:\n  - allocator_part_a\n  - allocator_part_b\n")
    out = tmp_path / "run"
    argv = ["run", "--model", str(tiny_model_dir), "--calib", str(text_files["calib"]), "--eval",
            str(text_files["eval"]), "--seq-len", "16", "--calib-samples", "2", "--kl-samples", "2", "--eval-samples",
            "4", "--tasks", str(group), "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    tasks = json.loads((out / "metrics.json").read_text())["tasks"]
    assert {k: v["items"] for k, v in tasks.items()} == {"allocator_part_a": 8, "allocator_part_b": 12}
