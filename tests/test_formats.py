"""``--format NAME``: plans made of what a toolkit stores, priced as it stores it, exported exactly.

Per target: a random plan over the target's grid -> export -> the toolkit's matching rules (readers of
tests/test_export.py, written from the toolkits' docs) -> each layer's setting equals the plan's, and the bits
of the tensors that toolkit writes for that setting (shapes counted here, independently of allocator.formats)
equal the plan's bits, layer by layer. SmolLM2's shapes (rows of 576 and 1536) exercise llama.cpp's fallbacks
and the group sizes that do not divide a row.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from transformers import LlamaConfig

from allocator.budget import Budget
from allocator.cli import main
from allocator.errors import AllocatorError
from allocator.export import EXPORTERS
from allocator.export.common import quant_setting
from allocator.formats import FORMATS as TARGETS
from allocator.formats import format_grid, storage_bits, unfit
from allocator.formats.llamacpp import stored_bits
from allocator.inventory import Inventory
from allocator.latency.architectures import meta_model
from allocator.levels import Level, parse_grid, parse_level
from allocator.plan import Plan
from tests.test_cli import _args
from tests.test_export import read_gptqmodel, read_llamacpp_types, read_llmcompressor

SMOL = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=3, num_attention_heads=9,
                   num_key_value_heads=3, vocab_size=256)  # fmt: skip
INV = Inventory.from_model(meta_model(SMOL))


VLLM_INTS = "dense,w8,w8g128,w4g128,w4g64,w4g32,w4g128a,w4g32a"  # what an llm-compressor recipe expresses


def target_plan(target: str, seed: int, levels: str | None = None) -> Plan:
    """A random plan over ``target``'s default grid (or ``levels``): each tie group a level fitting all its layers."""
    grid = format_grid(levels, target)
    rng = np.random.default_rng(seed)
    assignment = {}
    for group in INV.groups:
        fits = [lv for lv in grid if all(unfit(lv, INV[n].rows, INV[n].cols) is None for n in group)]
        level = fits[rng.integers(len(fits))]
        assignment.update(dict.fromkeys(group, level))
    return Plan.create(assignment, INV, "smol-3", Budget("bits", 16), grid, "test", seed)


# ---- what each toolkit writes for one layer, from the tensors it stores -------------------------------------
def gptq_bits(rows: int, cols: int, bits: int, group: int) -> int:
    """GPTQ layout (GPTQModel, AutoRound's auto_round): qweight, qzeros, fp16 scales, g_idx; all int32 packed."""
    groups_in = cols // group if group else 1
    tensors = {"qweight": (cols * bits // 32, rows, 32), "qzeros": (groups_in, rows * bits // 32, 32),
               "scales": (groups_in, rows, 16), "g_idx": (cols, 1, 32)}  # fmt: skip
    return sum(a * b * width for a, b, width in tensors.values())


def compressed_tensors_bits(rows: int, cols: int, bits: int, group: int, sym: bool) -> int:
    """compressed-tensors pack-quantized: weight_packed int32, weight_scale (16-bit), packed zero points if asym."""
    groups_in = cols // group if group else 1
    packed = rows * (cols * bits // 32) * 32
    return packed + rows * groups_in * 16 + (0 if sym else rows * groups_in * bits)


def test_every_target_grid_is_tagged_and_accepted():
    for name, target in TARGETS.items():
        grid = format_grid(None, name)
        assert grid[0].is_dense and len(grid) > 3
        assert all(lv.is_dense or lv.format == name for lv in grid)
        assert all(target.reason(lv) is None for lv in grid)
        assert [parse_level(lv.name) for lv in grid] == grid  # names round-trip
    assert format_grid("w4g32,w8", "vllm") == [parse_level("w4g32@vllm"), parse_level("w8@vllm")]


@pytest.mark.parametrize(("target", "level", "message"), [
    ("vllm", "w3g64", "WNA16 kernels run 4-bit"), ("vllm", "w8a", "and 8-bit symmetric weights, not w8a"),
    ("vllm", "s0.5", "not s0.5"), ("vllm", "2:4", "not 2:4"), ("vllm", "w4g100", "groups of"),
    ("autoround", "w8g128a", "only at \\(2, 3, 4\\) bits"), ("gptqmodel", "w5g32", "2/3/4/8-bit"),
    ("llamacpp", "w4g32", "GGUF types"), ("vllm", "q4_K", "made for llamacpp"), ("gptqmodel", "gguf", "made for"),
])  # fmt: skip
def test_a_target_refuses_levels_it_cannot_store_in_one_line(target, level, message):
    with pytest.raises(AllocatorError, match=message) as refused:
        format_grid(f"dense,{level}", target)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_llamacpp_plan_round_trip_types_and_stored_bits(seed, monkeypatch):
    import tests.test_export as export_tests

    monkeypatch.setattr(export_tests, "INV", INV)  # the reader matches this plan's layer names
    plan = target_plan("llamacpp", seed)
    files = EXPORTERS["llamacpp"](plan)
    types = read_llamacpp_types(files["tensor-types.txt"])
    for name, level in plan.assignment.items():
        rows, cols = plan.shapes[name]
        expected = "f16" if level.is_dense else level.name.lower()
        assert types[name] == expected  # llama-quantize's regex rules give the plan's type, and it fits the row
        assert stored_bits(types[name], rows, cols) == storage_bits(level, rows, cols)
    assert "(0 layers fall back" in files["llama-quantize.sh"]
    assert {lv.name for lv in plan.assignment.values()} & {"q2_K", "q3_K", "q4_K", "q5_K", "q6_K"}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptqmodel_plan_round_trip_settings_and_stored_bits(seed):
    plan = target_plan("gptqmodel", seed)
    config = json.loads(EXPORTERS["gptqmodel"](plan)["quantize_config.json"])
    for name, level in plan.assignment.items():
        got = read_gptqmodel(config, name)
        rows, cols = plan.shapes[name]
        assert got.weights == level.weights
        if level.quantized:
            assert gptq_bits(rows, cols, got.weights.bits, got.weights.group) == storage_bits(level, rows, cols)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_autoround_plan_round_trip_settings_and_stored_bits(seed):
    plan = target_plan("autoround", seed)
    layer_config = json.loads(EXPORTERS["autoround"](plan)["layer_config.json"])["layer_config"]
    for name, level in plan.assignment.items():
        got = layer_config[name]
        rows, cols = plan.shapes[name]
        assert (got["bits"], max(got["group_size"], 0), got["sym"]) == quant_setting(level)
        if level.quantized:
            assert gptq_bits(rows, cols, got["bits"], max(got["group_size"], 0)) == storage_bits(level, rows, cols)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vllm_plan_round_trip_settings_and_stored_bits(seed, monkeypatch):
    import tests.test_export as export_tests

    monkeypatch.setattr(export_tests, "INV", INV)  # the reader matches this plan's layer names
    plan = target_plan("vllm", seed, VLLM_INTS)
    levels, _ = read_llmcompressor(EXPORTERS["llmcompressor"](plan)["recipe.yaml"])
    for name, level in plan.assignment.items():
        got, (rows, cols) = levels[name], plan.shapes[name]
        assert got.weights == level.weights
        if level.quantized:
            bits = compressed_tensors_bits(rows, cols, *quant_setting(got))
            assert bits == storage_bits(level, rows, cols)


def test_groups_that_do_not_divide_a_row_are_unfit_and_priced_per_target():
    w4g128 = {t: parse_level(f"w4g128@{t}") for t in ("vllm", "gptqmodel", "autoround")}
    assert all("does not divide 576" in unfit(lv, 576, 576) for lv in w4g128.values())
    assert all(unfit(lv, 576, 1536) is None for lv in w4g128.values())
    generic = parse_level("w4g128").storage_bits(576, 1536)
    assert storage_bits(w4g128["vllm"], 576, 1536) == generic  # compressed-tensors stores what allocator counts
    extra = 576 * 12 * 4 + 1536 * 32  # GPTQ: a zero point per group even when symmetric, and g_idx
    assert storage_bits(w4g128["gptqmodel"], 576, 1536) == generic + extra
    assert math.isclose(storage_bits(w4g128["gptqmodel"], 576, 1536) / (576 * 1536), 4 + 20 / 128 + 32 / 576)


@pytest.mark.parametrize(("made", "fmt"), [("vllm", "gptqmodel"), ("gptqmodel", "llmcompressor"),
                                           ("autoround", "llamacpp"), ("llamacpp", "autoround")])  # fmt: skip
def test_an_exporter_refuses_a_plan_made_for_another_target_naming_every_layer(made, fmt):
    plan = target_plan(made, 0)
    with pytest.raises(AllocatorError, match=f"made for {made}") as refused:
        EXPORTERS[fmt](plan)
    tagged = [f"{n}={lv.name}" for n, lv in plan.assignment.items() if lv.format]
    assert len(tagged) > 6 and all(entry in str(refused.value) for entry in tagged)
    assert f"--to {TARGETS[made].exporter}" in str(refused.value)


def test_generic_plans_still_export_and_vllm_warns_what_it_cannot_serve(caplog):
    grid = parse_grid("dense,w3g64,w4g64,w8")
    assignment = {name: grid[1 + i % 3] for i, group in enumerate(INV.groups) for name in group}
    plan = Plan.create(assignment, INV, "smol-3", Budget("bits", 16), grid, "test", 0)
    EXPORTERS["gptqmodel"](plan)
    with caplog.at_level("WARNING"):
        EXPORTERS["llmcompressor"](plan)
    w3 = [n for n, lv in assignment.items() if lv.name == "w3g64"]
    assert "vLLM cannot serve" in caplog.text and all(f"{n}=w3g64" in caplog.text for n in w3)
    asym8 = Plan.create(dict.fromkeys(assignment, parse_level("w8a")), INV, "smol-3", Budget("bits", 16),
                        [Level(), parse_level("w8a")], "test", 0)  # fmt: skip
    with pytest.raises(AllocatorError, match="no asymmetric 8-bit") as refused:
        EXPORTERS["autoround"](asym8)
    assert all(f"{n}=w8a" in str(refused.value) for n in assignment)


def test_a_run_with_format_vllm_plans_exports_and_refuses_elsewhere(tiny_model_dir, text_files, tmp_path):
    run = tmp_path / "run"
    args = _args(tiny_model_dir, text_files, run, "--target", "bits=6", "--method", "knapsack", "--backend", "rtn",
                 "--format", "vllm", "--sensitivity", "error", "--cache-dir", str(tmp_path / "p"))  # fmt: skip
    assert main(args) == 0
    plan = Plan.load(run / "plan.json")
    assert {lv.format for lv in plan.assignment.values() if lv.quantized} == {"vllm"} and plan.achieved["bits"] <= 6
    assert json.loads((run / "config.json").read_text())["format"] == "vllm"
    assert json.loads((run / "plan.json").read_text())["format"] == "vllm" == plan.format
    assert plan.per == "tie-group"  # vLLM fuses q/k/v and gate/up: one setting each, so apply can pack it
    assert main(["apply", str(run / "plan.json"), "-o", str(tmp_path / "ckpt")]) == 0
    ckpt_config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert ckpt_config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert main(["export", str(run / "plan.json"), "--to", "llmcompressor", "-o", str(tmp_path / "x")]) == 0
    assert main(["export", str(run / "plan.json"), "--to", "gptqmodel", "-o", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()


@pytest.mark.parametrize(("extra", "message"), [
    (["--format", "llamacpp", "--backend", "gptq"], "--format llamacpp is simulated with --backend rtn or magnitude"),
    (["--format", "vllm", "--levels", "dense,w3g32"], "--format vllm cannot use level w3g32"),
    (["--format", "tpu"], "invalid choice"),
    (["--format", "vllm", "--per", "layer"], "--per layer plans cannot be loaded"),
])  # fmt: skip
def test_bad_format_runs_fail_in_one_line_before_any_work(extra, message, tiny_model_dir, text_files, tmp_path,
                                                         capsys):  # fmt: skip
    args = _args(tiny_model_dir, text_files, tmp_path / "run", "--target", "bits=6", *extra)
    with pytest.raises(SystemExit) if "invalid" in message else _no_raise():
        assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_compare_with_format_llamacpp_plans_every_method_in_gguf_types(tiny_model_dir, text_files, tmp_path):
    """``allocator compare --format llamacpp``: uniform and knapsack cells both made of GGUF types at the budget."""
    out = tmp_path / "cmp"
    argv = ["compare", "--model", str(tiny_model_dir), "--calib", str(text_files["calib"]),
            "--texts", str(text_files["eval"]), "--methods", "uniform,knapsack", "--targets", "bits=5",
            "--format", "llamacpp", "--backend", "rtn", "--sensitivity", "error", "--seq-len", "16",
            "--calib-samples", "2", "--kl-samples", "2", "--eval-samples", "4", "--no-dense-cache",
            "--cache-dir", str(tmp_path / "profiles"), "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    plans = [Plan.load(p) for p in sorted(out.rglob("plan.json"))]
    assert len(plans) == 2 and all(p.format == "llamacpp" and p.achieved["bits"] <= 5 for p in plans)
    assert all(lv.format == "llamacpp" for p in plans for lv in p.assignment.values() if lv.quantized)
