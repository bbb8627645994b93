"""A searcher added in one place gets its command-line flags, its config, the searcher contract and a
column in ``allocator compare``: nothing else is edited (the registry is patched for this test only)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from allocator.budget import Problem
from allocator.cli import build_parser, main
from allocator.errors import AllocatorError
from allocator.search import SEARCHERS, make_searcher
from allocator.search.base import SearchContext, Searcher, SearchResult, at_least, option
from allocator.search.repair import level_ladders
from allocator.search.uniform import Uniform
from tests.conftest import check_options_declared, check_searcher_contract


@dataclass
class Greedy(Searcher):
    """From the uniform plan, step units one level up (less compressed) in a seeded order while budgets hold."""

    name = "greedy"
    passes: int = option(1, "greedy: passes over the units")

    def __post_init__(self) -> None:
        at_least("--passes", self.passes, 1)

    def search(self, problem: Problem, ctx: SearchContext) -> SearchResult:
        choice, ladders = Uniform.choice(problem), level_ladders(problem)
        rng = np.random.default_rng(ctx.seed)
        steps = 0
        for _ in range(self.passes):
            for u in rng.permutation(len(choice)):
                rank = int(np.flatnonzero(ladders[u] == choice[u])[0])
                trial = choice.copy()
                trial[u] = ladders[u][max(rank - 1, 0)]
                if rank > 0 and problem.feasible(trial):
                    choice, steps = trial, steps + 1
        return SearchResult(choice, history=[{"steps": steps}])


@pytest.fixture
def greedy(monkeypatch):
    monkeypatch.setitem(SEARCHERS, "greedy", Greedy)


@pytest.mark.parametrize("target", ["sparsity=0.5", "bits=4.5"])
def test_it_is_held_to_the_searcher_contract(greedy, target):
    check_options_declared("greedy")
    check_searcher_contract("greedy", target, {"passes": 2})


def test_it_gets_flags_and_config(greedy):
    from allocator.cli.verbs import config_of

    config = config_of(build_parser().parse_args(["run", "--method", "greedy", "--passes", "3"]))
    assert config.method == "greedy" and config.options["passes"] == 3
    assert make_searcher("greedy", config.options).passes == 3
    assert main(["run", "--method", "greedy", "--passes", "0"]) == 2  # its own check, before any model work


def test_compare_checks_each_method_with_its_own_options():
    """Global flags that one method refuses are fine where its spec overrides them (cmaes needs the compact space)."""
    from allocator.compare import method_options
    from allocator.spec import RunConfig, resolve

    name, options = method_options("optuna:space=compact", {"sampler": "cmaes", "space": "levels"})
    assert options["space"] == "compact" == resolve(RunConfig(method=name, options=options)).searcher.space
    _, refused = method_options("optuna", {"sampler": "cmaes", "space": "levels"})
    with pytest.raises(AllocatorError, match="CMA-ES samples continuous spaces only"):
        resolve(RunConfig(method="optuna", options=refused))


def test_it_runs_in_compare_with_its_options(greedy, tiny_model_dir, text_files, tmp_path):
    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(tiny_model_dir), "--calib", str(text_files["calib"]),
            "--texts", str(text_files["eval"]), "--methods", "uniform,greedy:passes=2", "--targets", "sparsity=0.45",
            "--levels", "0:0.9:0.1", "--seq-len", "16", "--calib-samples", "2", "--kl-samples", "2",
            "--eval-samples", "4", "--no-dense-cache", "--cache-dir", str(tmp_path / "profiles"),
            "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    df = pd.read_csv(out / "compare.csv")
    assert list(df.method) == ["uniform", "greedy:passes=2"]
    cell = out / "sparsity=0.45" / "greedy_passes=2"
    assert json.loads((cell / "config.json").read_text())["options"]["passes"] == 2
    assert json.loads((cell / "plan.json").read_text())["method"] == "greedy"
    assert (cell / "history.csv").is_file()
    with pytest.raises(AllocatorError, match="greedy:OPTION=VALUE with OPTION one of passes"):
        from allocator.compare import method_options

        method_options("greedy:generations=3", {})
