from __future__ import annotations

import pytest
import torch

from allocator.errors import AllocatorError
from allocator.inventory import Inventory, weight_view
from allocator.model import load_model
from tests.conftest import tiny_model

EXPECTED_ROLES = {
    "llama": [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
EXPECTED_ROLES["qwen3"] = EXPECTED_ROLES["gemma3"] = EXPECTED_ROLES["llama"]


def test_inventory_lists_every_block_linear(family_model):
    family, model = family_model
    inv = Inventory.from_model(model)
    assert inv.n_blocks == 2
    assert [lay.role for lay in inv.layers] == EXPECTED_ROLES[family] * 2
    assert [lay.block for lay in inv.layers] == [0] * len(EXPECTED_ROLES[family]) + [1] * len(EXPECTED_ROLES[family])
    names = dict(model.named_modules())
    for lay in inv.layers:
        assert lay.name in names  # keyed by named_modules()
        # rows/cols are the true [out, in]: a forward of `cols` features gives `rows` features
        module = names[lay.name]
        assert module(torch.zeros(1, lay.cols)).shape[-1] == lay.rows
        assert lay.params == module.weight.numel()
    assert inv.params == sum(lay.params for lay in inv.layers)
    assert not any("embed" in lay.name or "lm_head" in lay.name or "wte" in lay.name for lay in inv.layers)


def test_tie_groups_follow_vllm_fusion():
    inv = Inventory.from_model(tiny_model("llama"))
    groups = {g[0].rsplit(".", 1)[-1]: g for g in inv.groups if g[0].startswith("model.layers.0.")}
    assert groups["q_proj"] == tuple(f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert groups["gate_proj"] == ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
    assert groups["o_proj"] == ("model.layers.0.self_attn.o_proj",)
    assert sorted(n for g in inv.groups for n in g) == sorted(lay.name for lay in inv.layers)
    assert len(inv.groups) == 2 * 4


def test_gpt2_weight_view_is_out_by_in_and_writes_through():
    model = tiny_model("gpt2")
    module = model.transformer.h[0].mlp.c_fc
    W = weight_view(module)
    assert W.shape == (module.nf, module.weight.shape[0])
    W[0, 0] = 123.0
    assert module.weight[0, 0] == 123.0


def test_lm_head_only_when_asked_and_untied():
    model = tiny_model("llama")
    inv = Inventory.from_model(model, include_lm_head=True)
    assert inv.layers[-1].name == "lm_head"
    assert not inv.tied_embeddings
    model.config.tie_word_embeddings = True  # a config flag alone ties nothing
    assert not Inventory.from_model(model).tied_embeddings
    model.lm_head.weight = model.get_input_embeddings().weight  # one tensor, two uses: found in the modules
    assert Inventory.from_model(model).tied_embeddings
    with pytest.raises(AllocatorError, match="tie_word_embeddings"):
        Inventory.from_model(model, include_lm_head=True)


def test_fingerprint_tells_models_apart():
    a = Inventory.from_model(tiny_model("llama")).fingerprint
    assert a == Inventory.from_model(tiny_model("llama", seed=1)).fingerprint  # weights do not matter
    assert a != Inventory.from_model(tiny_model("qwen3")).fingerprint


def test_load_local_folder(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    assert loaded.model_id == str(tiny_model_dir)
    assert len(Inventory.from_model(loaded.model).layers) == 14
    assert loaded.tokenizer("the model")["input_ids"]


@pytest.mark.parametrize("spec", ["./no/such/model", "/nonexistent/folder", "missing.gguf"])
def test_unknown_model_path_is_a_clear_error(spec):
    with pytest.raises(AllocatorError, match="does not exist|not a Hugging Face model folder"):
        load_model(spec)


def test_unreachable_hub_id_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AllocatorError, match="cannot load model"):
        load_model("nobody-here/no-such-model-xyz")
