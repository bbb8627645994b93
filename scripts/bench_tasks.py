"""Issue 34: a compare table with a local lm-eval task's accuracy beside perplexity, on the embedded model, offline.

The task is a cloze over C4 documents never used to calibrate (the last ``--held-out-docs`` of the sample): the
first ``--context-words`` words of a document, and which of four ``--choice-words``-word spans continues it (the
true one, or the same span of three other documents). It is written as lm-eval's own YAML over a JSONL, so the
real plumbing runs with no hub; a multiple-choice task scored by ``acc`` and ``acc_norm`` as HellaSwag is.

    python scripts/bench_tasks.py --out results/tasks_compare
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sensitivity import split_c4  # noqa: E402

from allocator import data  # noqa: E402
from allocator.cli import main as allocator  # noqa: E402
from allocator.io import write_json_atomic, write_text_atomic  # noqa: E402
from allocator.report import save_figure  # noqa: E402


def cloze_task(held_out: Path, folder: Path, items: int, context: int, choice: int, seed: int) -> Path:
    """The JSONL and lm-eval YAML of the cloze task; returns the YAML's path."""
    docs = [d.split() for d in held_out.read_text().splitlines()]
    docs = [d for d in docs if len(d) >= context + choice]
    rng = random.Random(seed)
    rows = []
    for i, doc in enumerate(docs[:items]):
        others = rng.sample([d for j, d in enumerate(docs) if j != i], 3)
        spans = [" ".join(d[context : context + choice]) for d in [doc, *others]]
        order = rng.sample(range(4), 4)
        rows.append({"context": " ".join(doc[:context]), "choices": [spans[k] for k in order],
                     "answer": order.index(0)})  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "c4_cloze.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = folder / "c4_cloze.yaml"
    task.write_text(
        "task: c4_heldout_cloze\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {(folder / 'c4_cloze.jsonl').resolve()}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return task


def plot(scores: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for i, (metric, sub) in enumerate(scores.groupby("metric")):
        x = np.arange(len(sub)) + 0.35 * i
        ax.bar(x, sub.value, 0.35, yerr=[sub.value - sub.lo, sub.hi - sub.value], capsize=3, label=metric)
        ax.scatter(x, sub.dense, marker="_", s=300, color="black", zorder=3, label="dense" if i == 0 else None)
        ax.set_xticks(np.arange(len(sub)) + 0.175, [f"{r.method}\n{r.target}" for r in sub.itertuples()])
    ax.set(ylabel="accuracy (95 % bootstrap interval)", title="C4 held-out cloze (lm-eval, 4 choices)", ylim=(0, 1))
    ax.axhline(0.25, color="grey", ls=":", label="chance")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--held-out-docs", type=int, default=400)
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--context-words", type=int, default=40)
    ap.add_argument("--choice-words", type=int, default=12)
    ap.add_argument("--targets", default="sparsity=0.5")
    ap.add_argument("--backend", default="wanda")
    ap.add_argument("--extra", default="--calib-samples 32 --eval-samples 16 --kl-samples 4",
                    help="more compare flags (what two CPU cores afford)")  # fmt: skip
    args = ap.parse_args()
    out = Path(args.out)
    work = out.parent / (out.name + "_work")
    work.mkdir(parents=True, exist_ok=True)
    calib, held_out = split_c4(Path(data.default_calibration()), args.held_out_docs, work)
    task = cloze_task(Path(held_out), work / "task", args.items, args.context_words, args.choice_words, 0)
    argv = ["compare", "--methods", "uniform,knapsack", "--targets", args.targets, "--backend", args.backend,
            "--calib", calib, "--texts", f"{data.default_evaluation()},{held_out}", "--tasks", str(task),
            *shlex.split(args.extra), "-o", str(work / "compare")]  # fmt: skip
    if allocator(argv) != 0:
        raise SystemExit("allocator compare failed")
    command = "python " + shlex.join(sys.argv)
    scores = pd.read_csv(work / "compare" / "tasks.csv")
    write_text_atomic(out.with_suffix(".csv"), scores.to_csv(index=False))
    md = re.sub(r"\]\(([^)]+\.png)\)", rf"]({out.name}_\1)", (work / "compare" / "compare.md").read_text())
    write_text_atomic(out.with_suffix(".md"), f"`{command}`\n\n(`allocator {shlex.join(argv)}`)\n\n{md}")
    for png in (work / "compare").glob("*.png"):
        shutil.copy(png, out.parent / f"{out.name}_{png.name}")
    plot(scores, out.with_suffix(".png"))
    write_json_atomic(out.with_suffix(".json"), {"command": command, "compare": ["allocator", *argv],
                                                 "rows": scores.to_dict("records")})  # fmt: skip


if __name__ == "__main__":
    main()
