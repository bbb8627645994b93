"""``allocator compare``: the bootstrap against a brute-force reference, and the command end to end."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from allocator.cli import main
from allocator.compare import bootstrap_perplexity
from allocator.evaluate import paired_ratio

# float32 logits: the per-window and the summed NLL differ in rounding only
F32 = 64 * torch.finfo(torch.float32).eps


def test_bootstrap_interval_matches_the_exact_resampling_distribution():
    """With 6 windows there are 6^6 equally likely resamples: the seeded bootstrap's quantiles approach
    the exact ones, the point estimate is exp(mean NLL), and equal windows have no spread."""
    nll = np.array([1.0, 2.0, 2.5, 3.0, 4.0, 6.0])
    exact = np.array([np.mean(c) for c in itertools.product(nll, repeat=len(nll))])
    ppl, lo, hi = bootstrap_perplexity(nll, samples=20000)
    assert ppl == pytest.approx(math.exp(nll.mean()), rel=1e-12)
    assert lo == pytest.approx(math.exp(np.quantile(exact, 0.025)), rel=0.02)
    assert hi == pytest.approx(math.exp(np.quantile(exact, 0.975)), rel=0.02)
    assert lo <= ppl <= hi
    assert bootstrap_perplexity(np.full(5, 1.5)) == pytest.approx((math.exp(1.5),) * 3)
    assert bootstrap_perplexity(nll) == bootstrap_perplexity(nll)  # seeded


def test_paired_ratio_matches_the_exact_resampling_distribution_of_the_window_differences():
    """Two models on the same 6 windows: the ratio is exp(mean NLL difference) and its interval the exact paired
    resampling's; a common shift of every window's NLL (a harder text) changes neither."""
    base = np.array([1.0, 2.0, 2.5, 3.0, 4.0, 6.0])
    nll = base + np.array([0.1, 0.3, -0.05, 0.2, 0.25, 0.15])
    exact = np.array([np.mean(c) for c in itertools.product(nll - base, repeat=len(nll))])
    ratio, lo, hi = paired_ratio(nll, base, samples=20000)
    assert ratio == pytest.approx(math.exp((nll - base).mean()), rel=1e-12)
    assert lo == pytest.approx(math.exp(np.quantile(exact, 0.025)), rel=0.01)
    assert hi == pytest.approx(math.exp(np.quantile(exact, 0.975)), rel=0.01)
    assert paired_ratio(nll + 3.0, base + 3.0) == pytest.approx(paired_ratio(nll, base), rel=1e-12)
    assert paired_ratio(base, base) == (1.0, 1.0, 1.0)


def test_compare_command_runs_every_cell_on_every_text_and_resumes(tiny_model_dir, text_files, tmp_path, capsys):
    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(tiny_model_dir), "--calib", str(text_files["calib"]),
            "--texts", f"{text_files['eval']},{text_files['calib']}", "--methods", "uniform,knapsack",
            "--targets", "sparsity=0.3;sparsity=0.6", "--sensitivity", "fisher", "--seq-len", "16",
            "--calib-samples", "2", "--kl-samples", "2", "--eval-samples", "6", "--no-dense-cache",
            "--cache-dir", str(tmp_path / "profiles"), "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    df = pd.read_csv(out / "compare.csv")
    assert len(df) == 2 * 2 * 2 and set(df.method) == {"uniform", "knapsack"}
    assert ((df.lo <= df.perplexity) & (df.perplexity <= df.hi)).all()
    assert np.allclose(df[df.method == "uniform"].vs_uniform, 1.0)
    assert (df[df.method == "uniform"][["ratio_lo", "ratio_hi"]] == 1.0).all().all()  # paired with itself
    assert ((df.ratio_lo <= df.vs_uniform + F32) & (df.vs_uniform <= df.ratio_hi + F32)).all()
    assert (df.groupby("target").sparsity.min() >= np.array([0.3, 0.6]) - 1e-9).all()
    # the first text is scored once, by the run (the same windows, the same plan): its windows' NLLs are kept
    for cell in (out / "sparsity=0.3").iterdir():
        metrics = json.loads((cell / "metrics.json").read_text())
        evals = json.loads((cell / "eval.json").read_text())
        first = evals[str(text_files["eval"])]
        assert first["window_nll"] == metrics["window_nll"] and len(first["window_nll"]) == 6
        assert first["perplexity"] == pytest.approx(metrics["perplexity"], rel=F32)
        assert (cell / "allocation.png").is_file()
    dense = json.loads((out / "dense" / "eval.json").read_text())
    assert dense[str(text_files["eval"])]["perplexity"] == pytest.approx(metrics["dense_perplexity"], rel=F32)
    md = (out / "compare.md").read_text()
    assert (
        md.count("## ") == 2
        and "[" in md
        and md.count("paired bootstrap") == 2
        and all((out / f"{p.name}.png").is_file() for p in text_files.values())
    )
    # resume: a finished cell is kept as it is, a lost one is redone
    kept = (out / "sparsity=0.6" / "knapsack" / "eval.json").stat().st_mtime_ns
    (out / "sparsity=0.3" / "uniform" / "eval.json").unlink()
    assert main(argv) == 0
    assert (out / "sparsity=0.6" / "knapsack" / "eval.json").stat().st_mtime_ns == kept
    assert (out / "sparsity=0.3" / "uniform" / "eval.json").is_file()
    assert pd.read_csv(out / "compare.csv").perplexity.tolist() == pytest.approx(df.perplexity.tolist())
    assert "vs_uniform" in capsys.readouterr().out
