from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import transformers

from allocator import data
from allocator.errors import AllocatorError
from tests.conftest import bos_word_tokenizer, repeated_sentences


def test_records_from_file_folder_and_parquet(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "d" / "b.txt").write_text("three\n")
    assert data.load_records(str(tmp_path / "d" / "a.txt")) == ["one", "two"]
    assert data.load_records(str(tmp_path / "d")) == ["one", "two", "three"]
    pd.DataFrame({"text": ["x y", "", "z"], "url": ["u", "v", "w"]}).to_parquet(tmp_path / "c.parquet")
    assert data.load_records(str(tmp_path / "c.parquet")) == ["x y", "z"]


def test_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(AllocatorError, match="does not exist"):
        data.load_records(str(tmp_path / "nope.txt"))
    with pytest.raises(AllocatorError, match="no .txt file"):
        data.load_records(str(tmp_path))
    pd.DataFrame({"body": ["x"]}).to_parquet(tmp_path / "c.parquet")
    with pytest.raises(AllocatorError, match="no 'text' column"):
        data.load_records(str(tmp_path / "c.parquet"))


def test_unreachable_dataset_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AllocatorError, match="cannot load dataset"):
        data.load_records("nobody-here/no-such-dataset:cfg@test")


def test_evaluation_windows_are_consecutive(tiny_tokenizer, text_files):
    records = data.load_records(str(text_files["eval"]))
    ids = tiny_tokenizer("\n\n".join(records), add_special_tokens=False)["input_ids"]
    seqs = data.evaluation_sequences(tiny_tokenizer, records, 32, None)
    assert seqs.shape == (len(ids) // 32, 32)
    assert seqs.flatten().tolist() == ids[: seqs.numel()]
    assert data.evaluation_sequences(tiny_tokenizer, records, 32, 3).shape == (3, 32)
    with pytest.raises(AllocatorError, match="windows"):
        data.evaluation_sequences(tiny_tokenizer, records, 32, 10_000)


def test_calibration_windows_are_seeded_slices_of_one_document(tiny_tokenizer, text_files):
    records = data.load_records(str(text_files["calib"]))
    a = data.calibration_sequences(tiny_tokenizer, records, 16, 6, seed=0)
    b = data.calibration_sequences(tiny_tokenizer, records, 16, 6, seed=0)
    c = data.calibration_sequences(tiny_tokenizer, records, 16, 6, seed=1)
    assert a.shape == (6, 16) and torch.equal(a, b) and not torch.equal(a, c)
    docs = [tiny_tokenizer(r, add_special_tokens=False)["input_ids"] for r in records]
    for window in a.tolist():
        assert any(doc[i : i + 16] == window for doc in docs for i in range(len(doc) - 15)), (
            "a window must lie inside one document"
        )
    with pytest.raises(AllocatorError, match="lower --seq-len"):
        data.calibration_sequences(tiny_tokenizer, records, 10_000, 2, seed=0)


def test_default_data_is_the_shared_offline_text():
    assert data.default_calibration().endswith("c4/validation-2k.parquet")
    assert data.default_evaluation().endswith("wikitext-2-raw/test.txt")


def test_bos_is_detected_from_the_tokenizer(tiny_tokenizer, bos_tokenizer):
    assert data.bos_token_id(bos_tokenizer) == 2
    assert data.bos_token_id(tiny_tokenizer) is None  # no BOS token at all
    # a BOS token the tokenizer does not put before text (SmolLM2's case): nothing is added
    plain = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tiny_tokenizer.backend_tokenizer, bos_token="<eos>", unk_token="<unk>"
    )
    assert data.bos_token_id(plain) is None


def test_windows_start_with_bos_and_score_every_text_token_once(bos_tokenizer, text_files):
    bos = data.bos_token_id(bos_tokenizer)
    records = data.load_records(str(text_files["eval"]))
    ids = bos_tokenizer("\n\n".join(records), add_special_tokens=False)["input_ids"]
    seqs = data.evaluation_sequences(bos_tokenizer, records, 32, None, bos)
    assert seqs.shape == (len(ids) // 31, 32) and (seqs[:, 0] == bos).all()
    assert seqs[:, 1:].flatten().tolist() == ids[: seqs.shape[0] * 31]  # consecutive text after each BOS
    assert not (seqs[:, 1:] == bos).any()
    calib = data.calibration_sequences(bos_tokenizer, data.load_records(str(text_files["calib"])), 16, 4, 0, bos)
    assert calib.shape == (4, 16) and (calib[:, 0] == bos).all() and not (calib[:, 1:] == bos).any()


BOS_MODEL = Path(__file__).parent / "data" / "bos-llama"  # trained with <bos> before every window


def test_a_bos_trained_model_scores_better_when_windows_start_with_bos(tmp_path):
    """The tiny model of scripts/train_bos_model.py saw <bos> before every training window, as Gemma and
    Llama-3 did. Run as a user would, with its tokenizer (which adds BOS) every window starts with BOS; with
    the same vocabulary in a tokenizer that adds none (the old path), its perplexity is worse."""
    import json
    import shutil

    from allocator.cli import main

    text = tmp_path / "text.txt"
    text.write_text(repeated_sentences(4000, seed=2) + "\n")  # held out: training used seed 1
    plain = tmp_path / "plain"
    shutil.copytree(BOS_MODEL, plain)
    bos_word_tokenizer(adds_bos=False).save_pretrained(plain)
    metrics = {}
    for name, folder in (("bos", BOS_MODEL), ("plain", plain)):
        out = tmp_path / name
        argv = ["run", "--model", str(folder), "--calib", str(text), "--eval", str(text), "--seq-len", "32",
                "--calib-samples", "2", "--kl-samples", "2", "--eval-samples", "100", "--target", "sparsity=0.1",
                "--no-dense-cache", "--cache-dir", str(tmp_path / "profiles"), "-o", str(out)]  # fmt: skip
        assert main(argv) == 0
        metrics[name] = json.loads((out / "metrics.json").read_text())
    assert metrics["bos"]["bos_per_window"] and not metrics["plain"]["bos_per_window"]
    with_bos, without = metrics["bos"]["dense_perplexity"], metrics["plain"]["dense_perplexity"]
    assert with_bos < 0.95 * without, (with_bos, without)


@pytest.mark.parametrize("seq_len", [0, 1])
def test_windows_need_two_tokens(tiny_tokenizer, bos_tokenizer, text_files, seq_len):
    records = data.load_records(str(text_files["eval"]))
    for tok, bos in ((tiny_tokenizer, None), (bos_tokenizer, 2)):
        with pytest.raises(AllocatorError, match="--seq-len must be at least 2"):
            data.evaluation_sequences(tok, records, seq_len, 1, bos)
        with pytest.raises(AllocatorError, match="--seq-len must be at least 2"):
            data.calibration_sequences(tok, records, seq_len, 1, 0, bos)
