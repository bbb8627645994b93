"""The documentation's runnable examples run as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.slow
def test_the_python_api_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ALLOCATOR_CACHE", str(tmp_path / "cache"))
    code = re.search(r"```python\n(.*?)```", (DOCS / "api.md").read_text(), re.S).group(1)
    ns: dict = {}
    exec(compile(code, "docs/api.md", "exec"), ns)  # noqa: S102 - our own documentation
    assert ns["result"].metrics["perplexity"] > ns["result"].metrics["dense_perplexity"]
    assert ns["plan"].backend["name"] == "wanda" and ns["plan"].method == "owl"
    for name, level in ns["plan"].assignment.items():  # the model in memory holds the plan's sparsity, row by row
        weight = ns["loaded"].model.get_submodule(name).weight
        assert torch.equal((weight == 0).sum(1), torch.full((weight.shape[0],), level.pruned_per_row(weight.shape[1])))
    # uniform within 10 bits/weight: s0.5 (9 bits with its mask), the least compressed that fits
    assert ns["found"].assignment["model.layers.0.mlp.down_proj"].name == "s0.5"
