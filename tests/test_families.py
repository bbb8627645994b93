"""Every decoder family a user brings, end to end on a tiny random model built from its config (no hub).

``run_checks`` is also what ``scripts/family_matrix.py`` runs to write ``results/families.*``.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from allocator.backends import BACKENDS, apply_
from allocator.backends.database import LevelDatabase
from allocator.budget import Budget, build_problem
from allocator.cli import main
from allocator.errors import AllocatorError
from allocator.export import EXPORTERS, export
from allocator.fitness import KLFitness
from allocator.inventory import Inventory, is_linear, weight_view
from allocator.levels import parse_grid, parse_level
from allocator.plan import Plan
from allocator.search.evolution import mutate
from allocator.search.repair import level_ladders
from tests.conftest import ALL_FAMILIES, MOE, VOCAB, search, tiny_model

CHECKS = ("inventory", "experts as units", "backends", "uniform run", "knapsack run", "apply + reload", "exporters",
          "prefix cache")  # fmt: skip


# what each family's tiny config means for its 2 blocks (Gemma-2 alternates from sliding; Gemma-3 has 1 full
# layer in 6; Mistral's config window applies to every layer); the rest attend fully
ATTENTION = {"gemma2": ("sliding:4096", "full"), "gemma3": ("sliding:16", "sliding:16"),
             "mistral": ("sliding:4096", "sliding:4096")}  # fmt: skip


def _inventory(family: str, _folder: Path, _work: Path, _texts: dict) -> None:
    model = tiny_model(family)
    inv = Inventory.from_model(model)
    assert inv.attention == ATTENTION.get(family, ("full", "full")), inv.attention
    assert inv.tied_embeddings == (family == "gpt2")  # GPT-2 ties by default; the other tiny configs untie them
    shares = {lay.share for lay in inv.layers if ".experts." in lay.name}
    assert shares == ({0.5} if family in MOE else set()), shares  # 2 of 4 experts per token
    assert all(lay.share == 1.0 for lay in inv.layers if ".experts." not in lay.name), "shared experts see every token"
    blocks = model.get_submodule(inv.blocks)
    routers = ("gate", "router", "shared_expert_gate")
    linears = {f"{inv.blocks}.{n}" for n, m in blocks.named_modules()
               if is_linear(m) and n.split(".")[-1] not in routers}  # fmt: skip
    assert inv.n_blocks == 2 and {lay.name for lay in inv.layers} == linears, "every block linear but routers is a unit"
    assert sorted(n for g in inv.groups for n in g) == sorted(lay.name for lay in inv.layers)


def _experts(family: str, _folder: Path, _work: Path, _texts: dict) -> None:
    """Routed experts are units (one per expert and projection), and unfusing them changes no output."""
    model = tiny_model(family)
    model.config._experts_implementation = "eager"  # transformers' own expert loop, which the unfused one replays
    x = torch.randint(VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x).logits
        inv = Inventory.from_model(model)
        assert torch.equal(model(x).logits, before)
    fused = [n for n, p in model.named_parameters() if p.dim() == 3]
    assert not fused, f"fused expert tensors left: {fused}"
    experts = {lay.name.split(".experts.")[1].split(".")[0] for lay in inv.layers if ".experts." in lay.name}
    n_experts = getattr(model.config, "num_local_experts", None) or getattr(model.config, "num_experts", 0)
    assert len(experts) == n_experts, (experts, n_experts)


def _backends(family: str, _folder: Path, _work: Path, _texts: dict) -> None:
    calib = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    for backend in BACKENDS:
        model = tiny_model(family)
        inv = Inventory.from_model(model)
        level = parse_level("w4g16" if backend in ("rtn", "gptq") else "s0.5")
        apply_(model, {lay.name: level for lay in inv.layers}, backend, calib, batch_size=2)
        for lay in inv.layers:
            W = weight_view(model.get_submodule(lay.name))
            if level.quantized:  # at most 2^4 values per row and group of 16
                groups = W.reshape(lay.rows, -1, 16)
                assert max(len(torch.unique(g)) for g in groups.flatten(0, 1)) <= 16, backend
            else:
                assert int((W != 0).sum()) == level.kept_params(lay.rows, lay.cols), backend
        assert torch.isfinite(model(calib).logits).all(), backend


def _args(folder: Path, texts: dict, out: Path, *extra: str) -> list[str]:
    return ["run", "--model", str(folder), "--calib", str(texts["calib"]), "--eval", str(texts["eval"]),
            "--seq-len", "16", "--calib-samples", "2", "--kl-samples", "2", "--eval-samples", "2",
            "--no-dense-cache", "--cache-dir", str(out.parent / "profiles"), "-o", str(out), *extra]  # fmt: skip


def _uniform(family: str, folder: Path, work: Path, texts: dict) -> None:
    assert main(_args(folder, texts, work / "uniform", "--target", "sparsity=0.5")) == 0
    assert main(_args(folder, texts, work / "bits", "--target", "bits=5", "--backend", "rtn",
                      "--levels", "dense,w8,w4g32")) == 0  # fmt: skip


def _knapsack(family: str, folder: Path, work: Path, texts: dict) -> None:
    out = work / "knapsack"
    argv = _args(folder, texts, out, "--target", "sparsity=0.5", "--method", "knapsack", "--sensitivity", "fisher")
    assert main(argv) == 0
    assert Plan.load(out / "plan.json").achieved["sparsity"] >= 0.5 - 1e-9


def _apply(family: str, folder: Path, work: Path, texts: dict) -> None:
    plan = Plan.load(work / "uniform" / "plan.json")
    assert main(["apply", str(work / "uniform" / "plan.json"), "-o", str(work / "ckpt")]) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(work / "ckpt")
    Inventory.from_model(reloaded)  # saved fused (the layout transformers loads), unfused for per-expert access
    for name, level in plan.assignment.items():
        W = weight_view(reloaded.get_submodule(name))
        assert int((W != 0).sum()) == level.kept_params(*W.shape), name


REFUSED: dict[str, set[str]] = {}  # every family: MoE plans with one level per expert role export to GGUF too


def _exporters(family: str, folder: Path, work: Path, texts: dict) -> None:
    """Each format takes the plans it can express; a refusal is a one-line AllocatorError, never a crash."""
    written = {}
    for run in ("uniform", "bits"):
        plan = Plan.load(work / run / "plan.json")
        for fmt in EXPORTERS:
            try:
                written[run, fmt] = export(plan, fmt, work / "exports" / run / fmt, "magnitude")
            except AllocatorError:
                continue
    expected = set(EXPORTERS) - REFUSED.get(family, set())
    assert {fmt for (_, fmt) in written} == expected, f"never exported: {expected - {f for _, f in written}}"


def _prefix_cache(family: str, _folder: Path, work: Path, _texts: dict) -> None:
    """The incremental fitness (from the first changed block, on cached inputs) equals a full forward."""
    model = tiny_model(family)
    inv = Inventory.from_model(model)
    grid = parse_grid("dense,s0.3,s0.6,s0.9")
    calib = torch.randint(VOCAB, (4, 16), generator=torch.Generator().manual_seed(0))
    db = LevelDatabase.build(model, inv, grid, "magnitude", work / "db", calib)
    problem = build_problem(inv, grid, Budget.parse("sparsity=0.3"))
    pool = torch.randint(VOCAB, (6, 16), generator=torch.Generator().manual_seed(1))
    fitness = KLFitness(model, inv, problem, db, pool, batch_size=4)
    parent = search("uniform", problem, 0).choice
    fitness.set_parent(parent)
    rng, batch = np.random.default_rng(0), np.array([0, 2, 5])
    assert fitness(parent, batch) > 0
    for _ in range(6):
        child = mutate(problem, parent, level_ladders(problem), rng)
        assert fitness(child, batch) == pytest.approx(fitness.full(child, batch), rel=1e-5, abs=1e-7)
    assert fitness.counters["block_forwards_saved"] > 0
    assert fitness.full(np.full(len(parent), 0), batch) == pytest.approx(0, abs=1e-6)  # dense: KL 0


RUNNERS: dict[str, Callable] = dict(zip(CHECKS, (_inventory, _experts, _backends, _uniform, _knapsack, _apply,
                                                 _exporters, _prefix_cache), strict=True))  # fmt: skip


def run_checks(family: str, folder: Path, work: Path, texts: dict) -> dict[str, str]:
    """Each check's outcome for ``family``: ``"pass"`` or the first line of what went wrong."""
    outcome = {}
    for check, runner in RUNNERS.items():
        try:
            runner(family, folder, work, texts)
            outcome[check] = "pass"
        except Exception as exc:  # the table records every failure instead of stopping at the first
            last = traceback.extract_tb(exc.__traceback__)[-1]
            outcome[check] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} ({last.name})"
    return outcome


@pytest.mark.parametrize("family", [*ALL_FAMILIES, *MOE])
def test_family_passes_every_check(family, tmp_path, tiny_tokenizer, text_files):
    folder = tmp_path / family
    tiny_model(family).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    outcome = run_checks(family, folder, tmp_path / "work", text_files)
    assert outcome == dict.fromkeys(CHECKS, "pass"), json.dumps(outcome, indent=1)
