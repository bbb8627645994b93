"""Corrupt state (issue 32): a damaged cache entry heals, a damaged user file is refused in one line.

A cache entry (dense reference, profile, level database, converted model) written by a first run is damaged the
way a kill or a full disk leaves it; the next run warns once naming the file, deletes and rebuilds the entry, and
ends with the clean run's result. A user's file (a profile named on the command line, a search checkpoint, an
Optuna journal, a run folder's config.json, a cache root that is a file) is refused in one line naming it and the
fix, and left as it was.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
from pathlib import Path

import gguf
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from allocator.cli import main
from allocator.errors import AllocatorError
from allocator.inventory import Inventory
from allocator.levels import parse_grid
from allocator.model import load_model
from allocator.search import trust
from allocator.workspace import Calibration, Workspace
from tests.conftest import VOCAB, ToyFitness, search, text_lines, tiny_model, toy_problem, word_tokenizer

GRID = parse_grid("0:0.8:0.2")


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _one_warning(caplog, name: str) -> str:
    """The one warning of the heal, naming ``name``."""
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and name in warnings[0] and "\n" not in warnings[0], warnings
    return warnings[0]


def _one_line(exc: pytest.ExceptionInfo, *fragments: str) -> None:
    text = str(exc.value)
    assert "\n" not in text and all(f in text for f in fragments), text


# ---- caches: dense reference, profile, level database (one calibration, entries written by a first call) ------
@pytest.fixture(scope="module")
def first(tmp_path_factory) -> dict:
    """A tiny model, its calibration, and a clean workspace holding its dense reference, profile and database."""
    model = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    calib, ev, kl = (torch.randint(VOCAB, (n, 16), generator=gen) for n in (4, 3, 2))
    cal = Calibration(model, Inventory.from_model(model), "tiny", calib, {"calib": "random"}, 2)
    root = tmp_path_factory.mktemp("clean")
    ws = Workspace(root)
    dense = ws.dense(model, ev, kl, 2)
    profile = ws.profile(cal, GRID, "wanda", with_database=True)
    db = ws.database(cal, GRID, "wanda")
    weights = {(x.name, lv.name): db.weight(x.name, lv) for x in cal.inventory.layers for lv in db.levels}
    return {"root": root, "cal": cal, "ev": ev, "kl": kl, "dense": dense, "profile": profile, "weights": weights}


@pytest.fixture
def cache(first, tmp_path) -> Path:
    """A copy of the clean workspace, to damage."""
    shutil.copytree(first["root"], tmp_path / "cache")
    return tmp_path / "cache"


def _dense_entry(cache: Path, suffix: str) -> Path:
    return next((cache / "dense").glob(f"*{suffix}"))


def _drop_perplexity(path: Path) -> None:
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != "perplexity"}))


def _shift_window_nll(path: Path) -> None:
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "window_nll": [v + 0.5 for v in meta["window_nll"]]}))


DENSE = {
    "truncated json": (".json", lambda p: _truncate(p, 0.3)),
    "a json list": (".json", lambda p: p.write_text("[1, 2]")),
    "perplexity missing": (".json", _drop_perplexity),
    "window NLLs that disagree with the perplexity": (".json", _shift_window_nll),
    "window NLLs not a list": (
        ".json",
        lambda p: p.write_text(json.dumps({**json.loads(p.read_text()), "window_nll": "1e9"})),
    ),
    "truncated safetensors": (".safetensors", _truncate),
}


@pytest.mark.parametrize("damage", DENSE)
def test_a_damaged_dense_reference_is_recomputed(damage, first, cache, caplog):
    suffix, hurt = DENSE[damage]
    hurt(_dense_entry(cache, suffix))
    ppl, teacher, cached, nll = Workspace(cache).dense(first["cal"].model, first["ev"], first["kl"], 2)
    _one_warning(caplog, str(_dense_entry(cache, ".json")))
    assert not cached and ppl == first["dense"][0] and torch.equal(teacher, first["dense"][1])
    assert np.array_equal(nll, first["dense"].window_nll)
    again = Workspace(cache).dense(first["cal"].model, first["ev"], first["kl"], 2)
    assert again[2] and again[0] == ppl  # the rewritten entry serves the next run


def _with_meta(path: Path, raw: bytes | None) -> None:
    """Rewrite the profile's schema metadata ``allocator`` (None: without it)."""
    table = pq.read_table(path)
    meta = {k: v for k, v in (table.schema.metadata or {}).items() if k != b"allocator"}
    pq.write_table(table.replace_schema_metadata({**meta, **({b"allocator": raw} if raw is not None else {})}), path)


def _no_fingerprint(path: Path) -> None:
    meta = json.loads(pq.read_table(path).schema.metadata[b"allocator"])
    _with_meta(path, json.dumps({k: v for k, v in meta.items() if k != "fingerprint"}).encode())


PROFILE = {
    "metadata not json": lambda p: _with_meta(p, b'{"version": 3, "finger'),
    "metadata a list": lambda p: _with_meta(p, b"[3]"),
    "no fingerprint": _no_fingerprint,
    "truncated parquet": _truncate,
}


@pytest.mark.parametrize("damage", PROFILE)
def test_a_damaged_cached_profile_is_measured_again_and_a_named_one_refused(damage, first, cache, caplog, tmp_path):
    entry = next((cache / "profiles").rglob("*.parquet"))
    PROFILE[damage](entry)
    named = tmp_path / "mine.parquet"
    shutil.copy(entry, named)
    with pytest.raises(AllocatorError) as exc:  # the user's file: one line, never re-measured or deleted
        Workspace(cache).profile(first["cal"], GRID, "wanda", path=str(named))
    _one_line(exc, str(named), "re-create")
    assert named.read_bytes() == entry.read_bytes()
    healed = Workspace(cache).profile(first["cal"], GRID, "wanda")
    _one_warning(caplog, str(entry))
    assert healed.table.equals(first["profile"].table)
    assert Workspace(cache).profile(first["cal"], GRID, "wanda").table.equals(healed.table)  # saved again


def _manifest(db: Path) -> dict:
    return json.loads((db / "manifest.json").read_text())


def _old_manifest_and_truncated_block(db: Path) -> None:
    """A database written before block sizes were recorded, then a block truncated: found by opening it."""
    manifest = _manifest(db)
    del manifest["files"]
    (db / "manifest.json").write_text(json.dumps(manifest))
    _truncate(db / "block_0001.safetensors")


DATABASE = {
    "truncated block": lambda db: _truncate(db / "block_0000.safetensors", 0.9),
    "garbage manifest": lambda db: (db / "manifest.json").write_text('{"version": 3, "lay'),
    "manifest a list": lambda db: (db / "manifest.json").write_text("[]"),
    "layers missing": lambda db: (db / "manifest.json").write_text(json.dumps({**_manifest(db), "layers": None})),
    "old manifest, truncated block": _old_manifest_and_truncated_block,
}


@pytest.mark.parametrize("damage", DATABASE)
def test_a_damaged_level_database_is_rebuilt(damage, first, cache, caplog):
    folder = next((cache / "db").glob("*/*"))
    DATABASE[damage](folder)
    db = Workspace(cache).database(first["cal"], GRID, "wanda")
    _one_warning(caplog, str(folder))
    levels = {lv.name: lv for lv in db.levels}
    assert levels.keys() == {name for _, name in first["weights"]}
    for (layer, name), W in first["weights"].items():
        assert torch.equal(db.weight(layer, levels[name]), W)
    assert set(_manifest(folder)["files"]) == {p.name for p in folder.glob("*.safetensors")}  # sizes recorded


# ---- the converted-model cache (a real tiny GGUF, converted once) ----------------------------------------------
def _tiny_gguf(path: Path) -> Path:
    """A 2-block llama GGUF with a tokenizer, small enough to convert in a second."""
    rng = np.random.default_rng(0)
    tokens = ["<unk>", "<s>", "</s>", "t", "o", "to", *[f"tok{i}" for i in range(26)]]
    w = gguf.GGUFWriter(path, "llama")
    for add, value in ((w.add_block_count, 2), (w.add_context_length, 64), (w.add_embedding_length, 64),
                       (w.add_feed_forward_length, 128), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_freq_base, 1e4), (w.add_tokenizer_model, "gpt2"),
                       (w.add_token_list, tokens), (w.add_token_types, [1] * len(tokens)),
                       (w.add_token_merges, ["t o"]), (w.add_bos_token_id, 1), (w.add_eos_token_id, 2)):  # fmt: skip
        add(value)
    shapes = {"token_embd.weight": (len(tokens), 64), "output_norm.weight": (64,), "output.weight": (len(tokens), 64)}
    for b in range(2):
        shapes |= {f"blk.{b}.{n}.weight": s for n, s in (("attn_norm", (64,)), ("ffn_norm", (64,)),
                   ("attn_q", (64, 64)), ("attn_k", (32, 64)), ("attn_v", (32, 64)), ("attn_output", (64, 64)),
                   ("ffn_gate", (128, 64)), ("ffn_up", (128, 64)), ("ffn_down", (64, 128)))}  # fmt: skip
    for name, shape in shapes.items():
        w.add_tensor(name, (0.02 * rng.standard_normal(shape)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _no_sizes_and_truncated(folder: Path) -> None:
    """A folder converted before sizes were recorded, then its weights truncated: found by opening them."""
    (folder / "allocator-files.json").unlink()
    _truncate(folder / "model.safetensors")


CONVERTED = {
    "truncated weights": lambda f: _truncate(f / "model.safetensors"),
    "sizes not json": lambda f: (f / "allocator-files.json").write_text("{"),
    "config missing": lambda f: (f / "config.json").unlink(),
    "no sizes, truncated weights": _no_sizes_and_truncated,
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gguf")
    source = _tiny_gguf(root / "tiny.gguf")
    clean = load_model(str(source), cache=root / "cache").model.state_dict()
    return {"source": source, "cache": root / "cache", "clean": clean}


@pytest.mark.parametrize("damage", CONVERTED)
def test_a_damaged_converted_model_is_converted_again(damage, converted, tmp_path, caplog):
    cache = tmp_path / "cache"
    shutil.copytree(converted["cache"], cache)
    folder = next((cache / "models").iterdir())
    CONVERTED[damage](folder)
    healed = load_model(str(converted["source"]), cache=cache).model.state_dict()
    _one_warning(caplog, str(folder))
    assert healed.keys() == converted["clean"].keys()
    assert all(torch.equal(healed[k], converted["clean"][k]) for k in healed)
    caplog.clear()
    load_model(str(converted["source"]), cache=cache)  # the new folder is whole: no second warning
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# ---- search checkpoints: the user's run folder, refused in one line and left alone -----------------------------
SEARCHES = {
    "evolution": ("evolution_state.json", {"generations": 2, "offspring": 3, "stages": "2@64,1@128"}),
    "guided": ("guided_state.json", {"generations": 2, "offspring": 4}),
    "fitted": ("fitted_state.json", {"fit_plans": 12, "fit_rounds": 1}),
}


def _field(name: str, value: object):
    """Set field ``name`` where the checkpoint keeps it (another search's checkpoint is left as it is)."""
    return lambda state: {**state, name: value} if name in state else state


CHECKPOINTS = {
    "a json list": lambda state: [state],
    "not json": None,
    "no key": lambda state: {k: v for k, v in state.items() if k != "key"},
    "field missing": lambda state: {k: v for k, v in state.items() if k not in ("parent", "kl")},
    "parent a string": _field("parent", "0,1,2"),
    "parent over the budget": lambda state: _field("parent", [0] * len(state["key"]["units"]))(state),
    "rng garbage": _field("rng", {"bit_generator": "PCG64", "state": "x"}),
    "generation negative": _field("generation", -1),
    "kl mistyped": _field("kl", {"1,2": "low"}),
    "pairs not plans": _field("pairs", [["a,b", "0", 0.1]]),
    "pairs mistyped": _field("pairs", [[1, 2]]),
}


@pytest.mark.parametrize("method", SEARCHES)
def test_a_damaged_checkpoint_is_refused_naming_it(method, tmp_path):
    name, options = SEARCHES[method]
    problem = toy_problem()
    search(method, problem, 0, ToyFitness(problem), workdir=tmp_path, **options)
    path = tmp_path / name
    state = json.loads(path.read_text())
    for case, change in CHECKPOINTS.items():
        if change is not None and change(state) == state:  # a field this search does not keep
            continue
        text = path.read_text()[:-40] if change is None else json.dumps(change(state))
        path.write_text(text)
        with pytest.raises(AllocatorError) as exc:
            search(method, problem, 0, ToyFitness(problem), workdir=tmp_path, resume=True, **options)
            pytest.fail(case)
        _one_line(exc, str(path))
        assert "delete it" in str(exc.value) or "another output folder" in str(exc.value), case
        assert path.read_text() == text, case  # left as it was
    path.write_text(json.dumps(state))  # restored: the search resumes
    search(method, problem, 0, ToyFitness(problem), workdir=tmp_path, resume=True, **options)


# ---- the Optuna journal: a torn last line, and CMA-ES's pickled state ------------------------------------------
def _plans(storage: str) -> list[tuple[str, ...]]:
    import optuna

    from allocator.search.study import open_storage

    trials = optuna.load_study(study_name="allocator", storage=open_storage(storage)).trials
    return sorted(tuple(t.user_attrs["plan"]) for t in trials if t.state == optuna.trial.TrialState.COMPLETE)


def test_a_torn_journal_line_is_cut_and_the_study_resumes(tmp_path, caplog):
    problem = toy_problem()
    clean = str(tmp_path / "clean.journal")
    best = search("optuna", problem, 0, ToyFitness(problem), trials=8, storage=clean).choice
    torn = tmp_path / "torn.journal"
    search("optuna", problem, 0, ToyFitness(problem), trials=5, storage=str(torn))
    with open(torn, "a") as f:
        f.write('{"op_code": 1, "worker')  # a kill during an append: no newline
    resumed = search("optuna", problem, 0, ToyFitness(problem), trials=8, storage=str(torn), resume=True).choice
    _one_warning(caplog, str(torn))
    assert np.array_equal(resumed, best) and _plans(str(torn)) == _plans(clean)
    assert torn.read_bytes().endswith(b"\n")


def test_a_journal_damaged_before_its_last_line_is_refused(tmp_path):
    problem = toy_problem()
    journal = tmp_path / "study.journal"
    search("optuna", problem, 0, ToyFitness(problem), trials=3, storage=str(journal))
    lines = journal.read_text().splitlines(keepends=True)
    journal.write_text("".join([*lines[:2], '{"op_code": 1, "wor\n', *lines[2:]]))
    with pytest.raises(AllocatorError) as exc:
        search("optuna", problem, 0, ToyFitness(problem), trials=5, storage=str(journal), resume=True)
    _one_line(exc, str(journal), "delete it")


@pytest.mark.filterwarnings("ignore:Constraints have been set")
def test_cmaes_refuses_a_study_another_process_created_without_unpickling(tmp_path, monkeypatch):
    problem = toy_problem()
    journal = str(tmp_path / "study.journal")
    options = {"space": "compact", "storage": journal}
    search("optuna", problem, 0, ToyFitness(problem), trials=13, sampler="cmaes", **options)
    assert "cma:optimizer:0" in Path(journal).read_text()  # the sampler's state, pickled, is in the journal
    search("optuna", problem, 0, ToyFitness(problem), trials=14, sampler="cmaes", resume=True, **options)  # ours
    monkeypatch.setattr(trust, "_CREATED", set())  # as a new process sees it: a journal someone else wrote

    def no_unpickling(*args, **kwargs):
        raise AssertionError("pickle.loads called on a foreign study")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    with pytest.raises(AllocatorError) as exc:
        search("optuna", problem, 0, ToyFitness(problem), trials=15, sampler="cmaes", resume=True, **options)
    _one_line(exc, "CMA-ES keeps its state pickled", journal, "--sampler tpe")
    search("optuna", problem, 0, ToyFitness(problem), trials=15, sampler="tpe", resume=True, **options)


# ---- user files through the command line: a cache root that is a file, a run folder's config.json --------------
@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> dict:
    """A tiny model, texts and one run whose plan is made schema 1 (its settings read from config.json)."""
    root = tmp_path_factory.mktemp("run")
    tiny_model("llama").save_pretrained(root / "tiny")
    word_tokenizer().save_pretrained(root / "tiny")
    for name, seed in (("calib", 1), ("eval", 2)):
        (root / f"{name}.txt").write_text("\n".join(text_lines(60, seed)) + "\n")
    argv = ["run", "--model", str(root / "tiny"), "--calib", str(root / "calib.txt"), "--eval",
            str(root / "eval.txt"), "--seq-len", "16", "--calib-samples", "2", "--kl-samples", "2",
            "--eval-samples", "4", "--target", "sparsity=0.3"]  # fmt: skip
    assert main([*argv, "--cache-dir", str(root / "cache"), "-o", str(root / "good")]) == 0
    plan = json.loads((root / "good" / "plan.json").read_text())
    plan = {k: v for k, v in plan.items() if k != "backend"} | {"schema_version": 1}
    return {"root": root, "argv": argv, "plan": plan, "config": json.loads((root / "good/config.json").read_text())}


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_a_cache_root_that_is_a_file_is_refused(run_folder, tmp_path, monkeypatch, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    argv = [*run_folder["argv"], "-o", str(tmp_path / "out")]
    for flags, env, fix in (([str(afile)], None, "--cache-dir"), ([str(afile / "sub")], None, "--cache-dir"),
                            ([], str(afile), "$ALLOCATOR_CACHE")):  # fmt: skip
        if env is not None:
            monkeypatch.setenv("ALLOCATOR_CACHE", env)
        assert main([*argv, *(["--cache-dir", *flags] if flags else [])]) == 2
        line = _error_line(capsys)
        assert str(afile) in line and fix in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"] and afile.read_text() == "mine"


CONFIGS = {
    "a string count": ({"seq_len": "16"}, "'seq_len' must be a whole number"),
    "a float count": ({"calib_samples": 2.5}, "'calib_samples' must be a whole number"),
    "a list target": ({"target": ["sparsity=0.3"]}, "'target' must be a string"),
    "a mistyped option": ({"options": {"trials": "many"}}, "'options.trials' must be a whole number"),
    "not an object": ([1, 2], "not a run's settings"),
    "not json": ('{"seq_len": 16,', "is corrupt"),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_a_run_folders_damaged_config_is_refused_naming_the_field(case, run_folder, tmp_path, capsys):
    change, match = CONFIGS[case]
    (tmp_path / "plan.json").write_text(json.dumps(run_folder["plan"]))
    config = {**run_folder["config"], **change} if isinstance(change, dict) else change
    (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    assert main(["apply", str(tmp_path / "plan.json"), "-o", str(tmp_path / "out")]) == 2
    line = _error_line(capsys)
    assert match in line and str(tmp_path / "config.json") in line, line
    assert not (tmp_path / "out").exists()


def test_a_run_with_every_cache_damaged_equals_the_clean_run(run_folder, tmp_path, caplog):
    """Dense reference, profile and level database damaged at once: three warnings, the clean run's plan and
    numbers."""
    root = run_folder["root"]
    shutil.copytree(root / "cache", tmp_path / "cache")
    argv = [
        *run_folder["argv"],
        "--method",
        "knapsack",
        "--sensitivity",
        "fitted",
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main([*argv, "-o", str(tmp_path / "clean")]) == 0  # measures the profile and database
    _truncate(_dense_entry(tmp_path / "cache", ".json"), 0.5)
    _truncate(next((tmp_path / "cache" / "profiles").rglob("*.parquet")))
    _truncate(next((tmp_path / "cache" / "db").rglob("block_0001.safetensors")))
    caplog.clear()
    assert main([*argv, "-o", str(tmp_path / "healed")]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3 and all("\n" not in w for w in warnings), warnings
    plans = [json.loads((tmp_path / f / "plan.json").read_text())["assignment"] for f in ("clean", "healed")]
    metrics = [json.loads((tmp_path / f / "metrics.json").read_text()) for f in ("clean", "healed")]
    assert plans[0] == plans[1]
    for key in ("dense_perplexity", "perplexity", "kl_to_dense", "achieved"):
        assert metrics[0][key] == metrics[1][key], key
