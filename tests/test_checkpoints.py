"""``allocator apply`` writes the compressed model itself, and the consumer's own loader reads back exactly what
allocator measured: compressed-tensors (through transformers, or compressed-tensors' own decompression) and GGUF."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from allocator.apply import plan_config
from allocator.checkpoints.packing import pack_int32
from allocator.cli import main
from allocator.evaluate import perplexity
from allocator.plan import Plan
from allocator.session import Session
from tests.test_cli import _args

ct_pack = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("cols", [64, 100, 33])
def test_int_packing_equals_compressed_tensors(bits, cols):
    gen = torch.Generator().manual_seed(bits * cols)
    codes = torch.randint(0, 2**bits, (5, cols), generator=gen, dtype=torch.uint8)
    theirs = ct_pack.pack_to_int32((codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8), bits)  # signed codes
    assert torch.equal(pack_int32(codes, bits), theirs)


def _reference(run, plan: Plan) -> Session:
    """The model as allocator compressed it for the plan's metrics, rebuilt from the plan alone."""
    session = Session(plan_config(run / "plan.json", plan, {}))
    session.compress_(plan.assignment, plan.backend["name"])
    return session


def _weights_equal(model, session: Session, plan: Plan) -> None:
    for name in plan.assignment:
        ours = session.model.get_submodule(name).weight
        theirs = model.get_submodule(name).weight
        assert theirs.dtype == ours.dtype and torch.equal(theirs, ours), name


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_compressed_tensors_checkpoint_loads_in_transformers_bit_for_bit(dtype, tiny_model_dir, text_files,
                                                                           tmp_path):  # fmt: skip
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    argv = _args(tiny_model_dir, text_files, run, "--method", "knapsack", "--sensitivity", "fisher", "--backend",
                 "gptq", "--levels", "dense,w8,w4g32,s0.5", "--target", "bits=6", "--per", "tie-group",
                 "--dtype", dtype, "--cache-dir", str(tmp_path / "c"))  # fmt: skip
    assert main(argv) == 0
    plan = Plan.load(run / "plan.json")
    assert {lv.name for lv in plan.assignment.values()} >= {"w8", "w4g32"}
    out = tmp_path / "ckpt"
    assert main(["apply", str(run / "plan.json"), "-o", str(out)]) == 0  # compressed-tensors by default
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert len(config["config_groups"]) == 2 and "lm_head" in config["ignore"]
    tensors = load_file(out / "model.safetensors")
    quantized = [n for n, lv in plan.assignment.items() if lv.quantized]
    assert all(f"{n}.weight_packed" in tensors and f"{n}.weight" not in tensors for n in quantized)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=getattr(torch, dtype)).eval()
    session = _reference(run, plan)
    recorded = json.loads((run / "metrics.json").read_text())["perplexity"]
    assert perplexity(model, session.eval_seqs, 4) == pytest.approx(recorded, rel=1e-4)  # decompresses on first use
    _weights_equal(model, session, plan)
    size = json.loads((out / "allocator_metrics.json").read_text())["size"]
    for name in quantized:  # packed codes, scales: what the plan priced (scales in the model's dtype)
        layer = size["layers"][name]
        assert layer["written_bytes"] <= layer["planned_bytes"] * (1 if dtype == "bfloat16" else 1.15)


def test_asymmetric_groups_decompress_exactly_with_compressed_tensors_own_reader(tiny_model_dir, text_files,
                                                                                 tmp_path):  # fmt: skip
    """transformers' compressed-tensors loader mis-shapes packed zero points (a bug in 0.19/0.20), so this
    checkpoint is read by compressed-tensors' own compress/decompress path, as vLLM's loader does it."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    run = tmp_path / "run"
    argv = _args(tiny_model_dir, text_files, run, "--method", "uniform", "--backend", "rtn", "--levels",
                 "dense,w4g32a", "--target", "bits=5", "--cache-dir", str(tmp_path / "c"))  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "ckpt"
    assert main(["apply", str(run / "plan.json"), "-o", str(out), "--checkpoint", "compressed-tensors"]) == 0
    config = AutoConfig.from_pretrained(out)
    ct = CompressedTensorsConfig.from_dict(config.quantization_config).quantization_config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    apply_quantization_config(model, ct)
    compressor = ModelCompressor(quantization_config=ct)
    compressor.compress_model(model)
    missing, unexpected = model.load_state_dict(load_file(out / "model.safetensors"), strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("weight")]
    compressor.decompress_model(model)
    plan = Plan.load(run / "plan.json")
    _weights_equal(model, _reference(run, plan), plan)


def test_what_compressed_tensors_cannot_hold_is_refused_naming_every_layer(tiny_model_dir, text_files, tmp_path,
                                                                           capsys):  # fmt: skip
    run = tmp_path / "run"
    argv = _args(tiny_model_dir, text_files, run, "--method", "knapsack", "--sensitivity", "fisher", "--backend",
                 "rtn", "--levels", "dense,w8,w4g32", "--target", "bits=6",
                 "--cache-dir", str(tmp_path / "c"))  # fmt: skip
    assert main(argv) == 0  # per layer: q/k/v may differ
    plan = Plan.load(run / "plan.json")
    assert main(["apply", str(run / "plan.json"), "-o", str(tmp_path / "x"), "--checkpoint", "compressed-tensors"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "--per tie-group" in err and not (tmp_path / "x").exists()
    assert main(["apply", str(run / "plan.json"), "-o", str(tmp_path / "y"), "--checkpoint", "gguf"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "not loaded from one" in err and not (tmp_path / "y").exists()
    assert plan.format == "any"


@pytest.mark.parametrize("level", ["fp8+afp8", "fp8t+afp8", "w8+a8", "w4g32+afp8", "nvfp4", "nvfp4+anvfp4",
                                   "mxfp4", "mxfp8"])  # fmt: skip
def test_every_float_and_activation_scheme_loads_with_its_activations(level, tiny_model_dir, text_files, tmp_path):
    """Each scheme as its own config group: transformers + compressed-tensors decompress the very weights and
    quantize the inputs as allocator simulated them, so the loaded model's perplexity is the plan's."""
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    served = level != "w4g32+afp8"  # vLLM's W4A8 kernel takes groups of 128, wider than this model's rows
    argv = _args(tiny_model_dir, text_files, run, "--method", "uniform", "--backend", "rtn", "--levels",
                 f"dense,{level}", "--target", "bits=9", "--dtype", "bfloat16", "--cache-dir", str(tmp_path / "c"),
                 *(["--format", "vllm", "--gpu", "b200"] if served else []))  # fmt: skip
    assert main(argv) == 0
    plan = Plan.load(run / "plan.json")
    assert {lv.name for lv in plan.assignment.values()} == {f"{level}@vllm" if served else level}
    out = tmp_path / "ckpt"
    assert main(["apply", str(run / "plan.json"), "-o", str(out)]) == 0
    group = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert (group["input_activations"] is not None) == ("+a" in level)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16).eval()
    session = _reference(run, plan)
    recorded = json.loads((run / "metrics.json").read_text())["perplexity"]
    assert perplexity(model, session.eval_seqs, 4) == pytest.approx(recorded, rel=1e-4)
    _weights_equal(model, session, plan)
    size = json.loads((out / "allocator_metrics.json").read_text())["size"]
    if served:  # priced as compressed-tensors stores it (W4A8 unpacked, one int8 per value)
        assert size["written_bytes"] == pytest.approx(size["planned_bytes"], rel=0.02)


def test_a_model_with_tied_embeddings_is_written_once_and_tied_again_on_load(tiny_tokenizer, text_files, tmp_path):
    """SmolLM2, Llama-3.2, Gemma tie ``lm_head`` to the embedding: one tensor in the file, tied again by the loader."""
    import transformers
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    torch.manual_seed(0)
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    folder = tmp_path / "tied"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    run = tmp_path / "run"
    argv = _args(folder, text_files, run, "--method", "uniform", "--backend", "rtn", "--levels", "dense,w8",
                 "--target", "bits=8.5", "--cache-dir", str(tmp_path / "c"))  # fmt: skip
    assert main(argv) == 0
    out = tmp_path / "ckpt"
    assert main(["apply", str(run / "plan.json"), "-o", str(out)]) == 0
    tensors = load_file(out / "model.safetensors")
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    plan = Plan.load(run / "plan.json")
    session = _reference(run, plan)
    recorded = json.loads((run / "metrics.json").read_text())["perplexity"]
    assert perplexity(model, session.eval_seqs, 4) == pytest.approx(recorded, rel=1e-4)  # decompresses on first use
    _weights_equal(model, session, plan)


def test_a_bfloat16_run_never_reuses_a_float32_runs_database(tiny_model_dir, text_files, tmp_path):
    """The level database keeps codes and grid scales as the run's dtype rounds them: a bfloat16 run after a float32
    one on the same cache builds its own, so its checkpoint still holds exactly the weights it measured."""
    from transformers import AutoModelForCausalLM

    def run(dtype: str):
        out = tmp_path / dtype
        argv = _args(tiny_model_dir, text_files, out, "--method", "knapsack", "--backend", "gptq", "--levels",
                     "dense,w8,w4g32", "--target", "bits=6", "--per", "tie-group", "--sensitivity", "fitted",
                     "--fit-plans", "12", "--fit-rounds", "1", "--dtype", dtype, "--cache-dir",
                     str(tmp_path / "c"))  # fmt: skip
        assert main(argv) == 0
        return out

    run("float32")
    out = run("bfloat16")
    assert len(list((tmp_path / "c" / "db").glob("*/*"))) == 2  # one database per dtype
    assert main(["apply", str(out / "plan.json"), "-o", str(tmp_path / "ckpt")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16).eval()
    plan = Plan.load(out / "plan.json")
    session = _reference(out, plan)
    recorded = json.loads((out / "metrics.json").read_text())["perplexity"]
    assert perplexity(model, session.eval_seqs, 4) == pytest.approx(recorded, rel=1e-4)
    _weights_equal(model, session, plan)
