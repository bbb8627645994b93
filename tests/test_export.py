"""Exports read back by each toolkit's own matching rules give the plan's levels; apply round-trips."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pandas as pd
import pytest
import yaml
from transformers import AutoModelForCausalLM, LlamaConfig

from allocator.apply import plan_config
from allocator.budget import Budget
from allocator.cli import main
from allocator.errors import AllocatorError
from allocator.evaluate import perplexity
from allocator.export import EXPORTERS
from allocator.formats.llamacpp import stored_bits, stored_type
from allocator.inventory import Inventory
from allocator.latency.architectures import meta_model
from allocator.levels import DENSE_BITS, Level, parse_grid, parse_level
from allocator.levels.ints import IntWeights
from allocator.plan import Plan
from allocator.session import Session
from tests.test_cli import _args

# 12 blocks: a pattern for block 1 that leaked into blocks 10 and 11 would show up
CONFIG = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=256)  # fmt: skip
INV = Inventory.from_model(meta_model(CONFIG))
FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
         "up_proj": "gate_up_proj"}  # fmt: skip


def make_plan(grid_text: str, seed: int, tied: bool = True) -> Plan:
    """A random plan over ``grid_text``; ``tied``: q/k/v and gate/up of a block share a level."""
    grid = parse_grid(grid_text)
    rng = np.random.default_rng(seed)
    assignment = {}
    for group in INV.groups:
        k = rng.integers(len(grid))
        for name in group:
            assignment[name] = grid[k if tied else rng.integers(len(grid))]
    return Plan.create(assignment, INV, "tiny-12", Budget("bits", 16), grid, "test", seed)


def fused_names(names) -> list[str]:
    return sorted(
        {f"{n.rpartition('.')[0]}.{FUSED[n.rpartition('.')[2]]}" for n in names if n.rpartition(".")[2] in FUSED}
    )


# ---- readers: each toolkit's documented matching rules, written independently of the exporters ----------------
def int_level(bits: int, group: int = 0, sym: bool = True, prune: str = "") -> Level:
    """The level a toolkit's (bits, group size, symmetry) setting reads as, after an optional pruning part."""
    weights = IntWeights(bits, group, sym).name if bits < DENSE_BITS else ""
    return parse_level("+".join(p for p in (prune, weights) if p) or "dense")


def ct_target(name: str, targets: list[str]) -> bool:
    """compressed-tensors: an exact name, or ``re:`` applied with re.match."""
    return any(t == name or (t.startswith("re:") and re.match(t[3:], name)) for t in targets)


def read_llmcompressor(text: str) -> tuple[dict[str, Level], dict[str, str]]:
    recipe = yaml.safe_load(text)
    names = [lay.name for lay in INV.layers]
    sparse: dict[str, Level] = {}
    quant: dict[str, tuple] = {}
    fused_group: dict[str, str] = {}
    for stage in recipe.values():
        for group in stage.values():
            for modifier, args in group.items():
                if modifier in ("SparseGPTModifier", "WandaPruningModifier"):
                    matched = [n for n in names if ct_target(n, args["targets"])]  # named_modules() order
                    assert len(matched) == len(args["sparsity"]), "sparsity list must align with the matches"
                    n_, m_ = map(int, args["mask_structure"].split(":"))
                    for name, s in zip(matched, args["sparsity"], strict=True):
                        sparse[name] = parse_level(f"{n_}:{m_}" if m_ else f"s{s}")
                else:
                    assert modifier == "GPTQModifier"
                    for name in names + fused_names(names):
                        if ct_target(name, args["ignore"]):
                            continue
                        hits = [g for g, cfg in args["config_groups"].items() if ct_target(name, cfg["targets"])]
                        if not hits:
                            continue
                        w = args["config_groups"][hits[0]]["weights"]
                        setting = (
                            w["num_bits"],
                            w.get("group_size", 0) if w["strategy"] == "group" else 0,
                            w["symmetric"],
                        )
                        if name in names:
                            quant[name] = setting
                        else:
                            fused_group[name] = hits[0]
    levels = {}
    for name in names:
        prune = sparse.get(name, Level()).prune
        levels[name] = int_level(*quant.get(name, (DENSE_BITS, 0, True)), prune=prune.name if prune else "")
    return levels, fused_group


def read_gptqmodel(config: dict, name: str) -> Level:
    """GPTQModel / vLLM: the first ``dynamic`` key that re.match-es wins; ``-:`` skips the module."""
    for key, override in config["dynamic"].items():
        sign, pattern = (key[:2], key[2:]) if key[:2] in ("+:", "-:") else ("+:", key)
        if re.match(pattern, name):
            if sign == "-:":
                return Level()
            g = override.get("group_size", config["group_size"])
            return int_level(override.get("bits", config["bits"]), max(g, 0), override.get("sym", config["sym"]))
    return int_level(config["bits"], max(config["group_size"], 0), config["sym"])


def read_llamacpp_types(text: str) -> dict[str, str]:
    """llama-quantize: lower-cased patterns, std::regex_search (unanchored), first match wins."""
    rules = [line.rsplit("=", 1) for line in text.split()]
    mapping = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, INV.n_blocks)
    out = {}
    for lay in INV.layers:
        tensor = mapping.get_name(lay.name) + ".weight"
        out[lay.name] = next(t for p, t in rules if re.search(p.lower(), tensor)).lower()
    return out


def read_llamacpp(text: str) -> dict[str, int]:
    """The bits of each layer's GGUF type."""
    types = {"f16": 16, "q8_0": 8, "q6_k": 6, "q5_k": 5, "q4_k": 4, "q3_k": 3, "q2_k": 2}
    return {name: types[kind] for name, kind in read_llamacpp_types(text).items()}


# ---- round trips ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_llmcompressor_round_trip_pruning_and_quantization(seed, tmp_path):
    plan = make_plan("dense,s0.3,s0.55,2:4,w4g32,w8,w4g64a,s0.5+w4g32", seed)
    files = EXPORTERS["llmcompressor"](plan, "wanda")
    levels, fused_group = read_llmcompressor(files["recipe.yaml"])
    assert {n: lv.name for n, lv in levels.items()} == {n: lv.name for n, lv in plan.assignment.items()}
    assert "WandaPruningModifier" in files["recipe.yaml"] and "sparsity: {" not in files["recipe.yaml"]
    # vLLM matches the fused qkv_proj / gate_up_proj names: they land in the group of their shards
    recipe = yaml.safe_load(files["recipe.yaml"])
    groups = recipe.get("quant_stage", {}).get("quant_modifiers", {}).get("GPTQModifier", {}).get("config_groups", {})
    for fused, group in fused_group.items():
        parent, _, leaf = fused.rpartition(".")
        shard = next(
            n for n in plan.assignment if n.rpartition(".")[0] == parent and FUSED.get(n.rpartition(".")[2]) == leaf
        )
        assert ct_target(shard, groups[group]["targets"])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptqmodel_round_trip_including_fused_names(seed):
    plan = make_plan("dense,w2g64,w3g128,w4g128,w4g32a,w8", seed)
    config = json.loads(EXPORTERS["gptqmodel"](plan)["quantize_config.json"])
    for name, level in plan.assignment.items():
        assert read_gptqmodel(config, name).name == level.name
    for fused in fused_names(plan.assignment):
        shard = next(n for n in plan.assignment if n.rpartition(".")[0] == fused.rpartition(".")[0]
                     and FUSED.get(n.rpartition(".")[2]) == fused.rpartition(".")[2])  # fmt: skip
        assert read_gptqmodel(config, fused).name == plan.assignment[shard].name


@pytest.mark.parametrize("seed", [0, 1])
def test_autoround_and_llamacpp_round_trip(seed):
    plan = make_plan("dense,w2g64,w3g128,w4g128,w5g32,w6g64,w8", seed, tied=False)
    config = json.loads(EXPORTERS["autoround"](plan)["layer_config.json"])
    for name, level in plan.assignment.items():
        got = config["layer_config"][name]
        assert int_level(got["bits"], max(got["group_size"], 0), got["sym"]) == level
    files = EXPORTERS["llamacpp"](plan)
    bits = {n: lv.weights.bits if lv.quantized else DENSE_BITS for n, lv in plan.assignment.items()}
    assert read_llamacpp(files["tensor-types.txt"]) == bits
    assert '--tensor-type-file "$HERE/tensor-types.txt" "$IN" "$OUT"' in files["llama-quantize.sh"]
    assert "^blk\\.1\\.ffn_down\\.weight$" in files["tensor-types.txt"]
    stored = {r.split(",")[0]: r.split(",")[1:] for r in files["stored-types.csv"].splitlines()[1:]}
    assert set(stored) == set(plan.assignment)
    for name, (asked, kind, _, bits) in stored.items():
        assert kind == stored_type(asked, plan.shapes[name][1]) and int(bits) == stored_bits(asked, *plan.shapes[name])


@pytest.mark.parametrize(
    "kind,cols,stored,bpw",
    [("q4_K", 1536, "q4_K", 4.5), ("q4_K", 576, "q5_0", 5.5), ("q2_K", 576, "q4_0", 4.5), ("q3_K", 512, "q3_K", 3.4375),
     ("q5_K", 576, "q5_1", 6.0), ("q6_K", 576, "q8_0", 8.5), ("q8_0", 576, "q8_0", 8.5), ("q8_0", 48, "f16", 16.0),
     ("q4_K", 48, "f16", 16.0), ("f16", 7, "f16", 16.0)],
)  # fmt: skip
def test_gguf_types_are_priced_as_llama_cpp_stores_them(kind, cols, stored, bpw):
    """llama-quant.cpp's tensor_type_fallback: a 256-block type on a row it does not divide is stored as
    another type, and as F16 when that one does not fit either; bits from gguf-py's block sizes."""
    assert stored_type(kind, cols) == stored
    assert stored_bits(kind, 3, cols) == pytest.approx(3 * cols * bpw, abs=0)


def test_a_plan_of_gguf_types_is_exported_exactly_and_refused_elsewhere():
    """``--levels gguf`` plans: each tensor gets its level's own type and nothing falls back; toolkits that
    do not store GGUF types refuse the plan naming every layer."""
    grid, rng = parse_grid("gguf"), np.random.default_rng(0)
    fit = {lay.name: [lv for lv in grid if lv.unfit_reason(lay.rows, lay.cols) is None] for lay in INV.layers}
    assignment = {name: options[rng.integers(len(options))] for name, options in fit.items()}
    plan = Plan.create(assignment, INV, "tiny-12", Budget("bits", 16), grid, "test", 0)
    assert any(lv.quantized for lv in assignment.values())
    files = EXPORTERS["llamacpp"](plan)
    expected = {n: "f16" if lv.is_dense else lv.name.lower() for n, lv in plan.assignment.items()}
    assert read_llamacpp_types(files["tensor-types.txt"]) == expected
    stored = [r.split(",") for r in files["stored-types.csv"].splitlines()[1:]]
    assert all(asked == kind and plan_bits == bits for _, asked, kind, plan_bits, bits in stored)
    for fmt in ("gptqmodel", "autoround", "llmcompressor"):
        with pytest.raises(AllocatorError, match="made for llamacpp") as refused:
            EXPORTERS[fmt](plan)
        assert all(f"{n}={lv.name}" in str(refused.value) for n, lv in plan.assignment.items() if lv.quantized)


def test_a_run_over_the_gguf_grid_keeps_its_budget_as_llama_cpp_stores_it(tiny_model_dir, text_files, tmp_path):
    """``--levels gguf`` end to end: the plan's bits are the bits llama.cpp writes (no layer falls back)."""
    run = tmp_path / "run"
    args = _args(tiny_model_dir, text_files, run, "--target", "bits=6", "--method", "knapsack", "--backend", "rtn",
                 "--levels", "gguf", "--sensitivity", "error", "--cache-dir", str(tmp_path / "p"))  # fmt: skip
    assert main(args) == 0
    plan = Plan.load(run / "plan.json")
    assert {lv.format for lv in plan.assignment.values()} <= {"llamacpp", ""} and plan.achieved["bits"] <= 6
    assert main(["export", str(run / "plan.json"), "--to", "llamacpp", "-o", str(tmp_path / "x")]) == 0
    stored = [r.split(",") for r in (tmp_path / "x" / "stored-types.csv").read_text().splitlines()[1:]]
    params = sum(r * c for r, c in plan.shapes.values())
    assert all(asked == kind for _, asked, kind, _, _ in stored)
    assert sum(int(r[4]) for r in stored) / params == pytest.approx(plan.achieved["bits"], rel=1e-12)


def test_llamacpp_script_requantizes_a_quantized_source(tmp_path):
    """The script adds --allow-requantize only when the input GGUF holds quantized tensors."""
    plan = make_plan("dense,w4g128,w8", 0, tied=False)
    files = EXPORTERS["llamacpp"](plan)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    fake = tmp_path / "llama-quantize"
    fake.write_text('#!/usr/bin/env bash\necho "$@" > "$(dirname "$0")/args"\n')
    fake.chmod(0o755)
    for quantized in (False, True):
        writer = gguf.GGUFWriter(tmp_path / "in.gguf", "llama")
        data = np.zeros((2, 32), dtype=np.float32)
        if quantized:
            writer.add_tensor(
                "w", gguf.quantize(data, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0
            )
        else:
            writer.add_tensor("w", data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        env = {**os.environ, "LLAMA_QUANTIZE": str(fake), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        script, gguf_in, gguf_out = (str(tmp_path / n) for n in ("llama-quantize.sh", "in.gguf", "o.gguf"))
        subprocess.run(["bash", script, gguf_in, gguf_out], check=True, env=env)
        args = (tmp_path / "args").read_text().split()
        assert ("--allow-requantize" in args) == quantized and args[-1] in ("Q4_K", "Q8_0")


def test_json_and_csv_round_trip(tmp_path):
    plan = make_plan("dense,s0.5,2:4,w4g128,s0.5+w4g128,drop", 3, tied=False)
    (tmp_path / "p.json").write_text(EXPORTERS["json"](plan)["plan.json"])
    assert Plan.load(tmp_path / "p.json", INV).assignment == plan.assignment
    (tmp_path / "p.csv").write_text(EXPORTERS["csv"](plan)["plan.csv"])
    df = pd.read_csv(tmp_path / "p.csv")
    assert list(df.layer) == [lay.name for lay in INV.layers]
    assert {r.layer: parse_level(r.level) for r in df.itertuples()} == plan.assignment


@pytest.mark.parametrize(("fmt", "grid", "message"), [
    ("gptqmodel", "dense,s0.5", "GPTQModel cannot express levels \\['s0.5'\\]"),
    ("gptqmodel", "dense,w5g128", "GPTQModel runs \\[2, 3, 4, 8\\]-bit"),
    ("llamacpp", "dense,2:4", "llama.cpp cannot express levels \\['2:4'\\]"),
    ("autoround", "dense,s0.5+w4g128", "AutoRound cannot express"),
    ("llmcompressor", "dense,drop", "llm-compressor cannot express levels \\['drop'\\]"),
])  # fmt: skip
def test_exporters_refuse_what_their_target_cannot_express(fmt, grid, message):
    plan = make_plan(grid, 0)
    with pytest.raises(AllocatorError, match=message) as refused:
        EXPORTERS[fmt](plan)
    if "cannot express" in message:  # every offending layer is named, not the first few
        bad = ast.literal_eval(re.search(r"express levels (\[.*?\])", str(refused.value)).group(1))
        offending = [f"{n}={lv.name}" for n, lv in plan.assignment.items() if lv.name in bad]
        assert offending and all(entry in str(refused.value) for entry in offending)


@pytest.mark.parametrize("fmt", ["llmcompressor", "gptqmodel"])
def test_vllm_bound_formats_refuse_split_tie_groups(fmt):
    grid = parse_grid("w4g128,w8")
    assignment = {lay.name: grid[0] for lay in INV.layers}
    assignment["model.layers.10.self_attn.k_proj"] = grid[1]
    plan = Plan.create(assignment, INV, "tiny-12", Budget("bits", 16), grid, "test", 0)
    with pytest.raises(
        AllocatorError, match=r"--per tie-group; the plan splits all of .*model\.layers\.10\.self_attn\.qkv_proj"
    ):
        EXPORTERS[fmt](plan)
    EXPORTERS["autoround"](plan)  # per-module formats take it


def test_cli_export_writes_files_and_refuses_cleanly(tmp_path, capsys):
    plan = make_plan("dense,w4g128,w8", 0)
    plan.save(tmp_path / "plan.json")
    assert main(["export", str(tmp_path / "plan.json"), "--to", "gptqmodel"]) == 0
    assert (tmp_path / "exports" / "gptqmodel" / "quantize_config.json").is_file()
    make_plan("dense,s0.5", 0).save(tmp_path / "sparse.json")
    assert main(["export", str(tmp_path / "sparse.json"), "--to", "llamacpp", "-o", str(tmp_path / "x")]) == 2
    assert "llama.cpp cannot express" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_apply_reloads_with_plain_transformers_and_reproduces_perplexity(tiny_model_dir, text_files, tmp_path):
    run = tmp_path / "run"
    args = _args(tiny_model_dir, text_files, run, "--target", "bits=4", "--method", "knapsack", "--backend", "rtn",
                 "--levels", "dense,w8,w4g32,w2g16a", "--sensitivity", "fitted", "--cache-dir",
                 str(tmp_path / "profiles"))  # fmt: skip
    assert main(args) == 0
    out = tmp_path / "ckpt"
    assert main(["apply", str(run / "plan.json"), "-o", str(out), "--checkpoint", "hf"]) == 0
    assert (out / "model.safetensors").is_file() and (out / "allocator_plan.json").is_file()
    recorded = json.loads((run / "metrics.json").read_text())["perplexity"]
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()  # plain transformers, no allocator code
    session = Session(plan_config(run / "plan.json", Plan.load(run / "plan.json"), {}))
    assert perplexity(reloaded, session.eval_seqs, 4) == pytest.approx(recorded, rel=1e-4)
    # the weights really are the compressed ones: a dense reload is measurably different
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert abs(perplexity(dense, session.eval_seqs, 4) / recorded - 1) > 1e-3
    plan = Plan.load(run / "plan.json")
    low = [(n, lv.weights) for n, lv in plan.assignment.items() if lv.quantized and lv.weights.bits <= 4]
    assert low
    for name, w in low:  # each stored row holds at most 2**bits values per quantization group
        row = reloaded.get_submodule(name).weight[0]
        assert len(row.unique()) <= 2**w.bits * -(-row.numel() // w.group)
    assert main(["apply", str(run / "plan.json"), "-o", str(out)]) == 2  # never overwrites a checkpoint


def test_report_of_a_folder_of_runs(tiny_model_dir, text_files, tmp_path):
    runs = tmp_path / "runs"
    for target in ("sparsity=0.3", "sparsity=0.6"):
        out = runs / target.replace("=", "")
        assert main(_args(tiny_model_dir, text_files, out, "--target", target)) == 0
    assert main(["report", str(runs)]) == 0
    text = (runs / "report.md").read_text()
    assert "## All runs" in text and "sparsity0.3/allocation.png" in text
    assert (runs / "perplexity.png").is_file() and (runs / "sparsity0.6" / "allocation.png").is_file()
    assert main(["report", str(tmp_path / "empty")]) == 2


def _llmcompressor():
    """llm-compressor and compressed-tensors as setup.sh installs them (apart, in .venv/toolkits)."""
    import sys
    from pathlib import Path

    site = Path(sys.prefix) / "toolkits"
    if site.is_dir() and str(site) not in sys.path:
        sys.path.append(str(site))
    recipe = pytest.importorskip("llmcompressor.recipe", reason="llm-compressor not installed (scripts/setup.sh)")
    match = pytest.importorskip("compressed_tensors.utils.match")
    return recipe.Recipe, match


@pytest.mark.parametrize("seed", [0, 1])
def test_llmcompressor_own_parser_reads_our_recipe(seed, tmp_path):
    """llm-compressor builds its modifiers from the recipe, and compressed-tensors' matcher, run on the
    model's modules, gives every layer the plan's level (fused vLLM names included)."""
    Recipe, match = _llmcompressor()
    from torch import nn

    plan = make_plan("dense,s0.3,s0.55,2:4,w4g32,w8,w4g64a,s0.5+w4g32", seed)
    (tmp_path / "recipe.yaml").write_text(EXPORTERS["llmcompressor"](plan, "sparsegpt")["recipe.yaml"])
    modifiers = Recipe.create_instance(str(tmp_path / "recipe.yaml")).modifiers
    model = meta_model(CONFIG)
    got = {lay.name: {} for lay in INV.layers}
    for m in modifiers:
        kind = type(m).__name__
        if kind == "SparseGPTModifier":
            matched = [name for name, _ in match.match_named_modules(model, m.targets, m.ignore)]
            assert len(matched) == len(m.sparsity)
            n_, m_ = map(int, m.mask_structure.split(":"))
            for name, s in zip(matched, m.sparsity, strict=True):
                got[name]["prune"] = f"{n_}:{m_}" if m_ else f"s{s}"
        else:
            assert kind == "GPTQModifier"
            fused = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
            for name in got:
                module = model.get_submodule(name)
                hits = [g for g, scheme in m.config_groups.items()
                        if match.is_match(name, module, scheme.targets, m.ignore)]  # fmt: skip
                assert len(hits) <= 1
                if hits:
                    w = m.config_groups[hits[0]].weights
                    got[name]["weights"] = (w.num_bits, w.group_size or 0, w.symmetric)
            for name in fused_names(got):  # vLLM's fused layers resolve to their shards' group
                hits = [
                    g
                    for g, s in m.config_groups.items()
                    if match.is_match(name, nn.Linear(1, 1), s.targets, fused=fused)
                ]
                shard = next(n for n in got if n.rpartition(".")[0] == name.rpartition(".")[0]
                             and FUSED.get(n.rpartition(".")[2]) == name.rpartition(".")[2])  # fmt: skip
                assert (len(hits) == 1) == plan.assignment[shard].quantized
    read = {n: int_level(*f.get("weights", (DENSE_BITS, 0, True)), prune=f.get("prune", "")) for n, f in got.items()}
    assert {n: lv.name for n, lv in read.items()} == {n: lv.name for n, lv in plan.assignment.items()}
