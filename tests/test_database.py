from __future__ import annotations

import pytest
import torch

from allocator.backends import apply_
from allocator.backends.database import LevelDatabase
from allocator.backends.db_files import dense_weights
from allocator.errors import AllocatorError
from allocator.inventory import Inventory, weight_view
from allocator.levels import parse_grid, parse_level, with_dense
from tests.conftest import VOCAB, tiny_model


def test_database_round_trip_matches_direct_compression(tmp_path):
    model = tiny_model("llama")
    inv = Inventory.from_model(model)
    grid = parse_grid("s0.3,s0.6,2:4,w4g32")
    calib = torch.randint(VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    db = LevelDatabase.build(model, inv, grid, "sparsegpt", tmp_path / "db", calib, batch_size=2)
    assert db.manifest["bytes"] > 0 and sorted(p.name for p in tmp_path.iterdir()) == ["db"]
    assert [lv.name for lv in db.levels] == ["dense", "s0.3", "s0.6", "2:4", "w4g32"]
    db = LevelDatabase.open(tmp_path / "db", inv, dense_weights(model, inv))
    # the first block sees the same (dense) inputs either way, so the database equals direct compression there
    target = tiny_model("llama")
    first = {lay.name: grid[1] for lay in inv.layers if lay.block == 0}
    apply_(target, first, "sparsegpt", calib, batch_size=2)
    loaded = tiny_model("llama")
    db.load_into_(loaded, first)
    for name in first:
        assert torch.allclose(weight_view(loaded.get_submodule(name)), weight_view(target.get_submodule(name)))
    # the dense level restores the original
    db.load_into_(loaded, {name: db.levels[0] for name in first})
    for name in first:
        assert torch.equal(weight_view(loaded.get_submodule(name)), weight_view(model.get_submodule(name)))


def test_database_for_another_model_is_refused(tmp_path):
    model = tiny_model("llama")
    calib = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    LevelDatabase.build(model, Inventory.from_model(model), parse_grid("s0.5"), "magnitude", tmp_path / "db", calib)
    with pytest.raises(AllocatorError, match="another model"):
        LevelDatabase.open(tmp_path / "db", Inventory.from_model(tiny_model("qwen3")))
    with pytest.raises(AllocatorError, match="not a level database"):
        LevelDatabase.open(tmp_path / "nothing")


def test_profile_pass_builds_the_same_database(tmp_path):
    """One per-level pass feeds the profile and the database: equal to a database built on its own."""
    from allocator.backends.db_writer import DatabaseWriter
    from allocator.profile import Profile

    model = tiny_model("llama")
    inv = Inventory.from_model(model)
    grid = parse_grid("dense,s0.4,2:4,w3g32")
    calib = torch.randint(VOCAB, (4, 32), generator=torch.Generator().manual_seed(1))
    alone = LevelDatabase.build(model, inv, grid, "sparsegpt", tmp_path / "alone", calib, batch_size=2)
    with DatabaseWriter(inv, grid, "sparsegpt", tmp_path / "shared", calib) as writer:
        Profile.measure(model, inv, grid, "sparsegpt", calib, batch_size=2, also=[writer])
    shared = LevelDatabase.open(tmp_path / "shared", inv, dense_weights(model, inv))
    assert shared.manifest["levels"] == alone.manifest["levels"] and shared.manifest["bytes"] == alone.manifest["bytes"]
    for layer in inv.layers:
        for level in grid:
            assert torch.equal(shared.weight(layer.name, level), alone.weight(layer.name, level))


def test_interrupted_writer_leaves_no_database(tmp_path):
    from allocator.backends.db_writer import DatabaseWriter

    model = tiny_model("llama")
    inv = Inventory.from_model(model)
    calib = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(KeyboardInterrupt), DatabaseWriter(inv, parse_grid("s0.5"), "magnitude", tmp_path / "db", calib):
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("backend", ["wanda", "sparsegpt", "gptq"])
def test_database_files_decode_to_the_pass_outputs(backend, tmp_path):
    """Written, reopened and made resident: every (layer, level) equals what the backend produced."""
    from allocator.backends.all_levels import for_each_level
    from allocator.backends.db_writer import DatabaseWriter

    model = tiny_model("llama")
    inv = Inventory.from_model(model)
    grid = with_dense(parse_grid("s0.25,s0.5,2:4,w4g16,s0.5+w4g16,w8a"))
    calib = torch.randint(VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    seen = {}
    with DatabaseWriter(inv, grid, backend, tmp_path / "db", calib) as writer:

        def visit(layer, level, W, Q, stats, params):
            seen[layer.name, level.name] = Q.clone()
            writer.visit(layer, level, W, Q, stats, params)

        for_each_level(model, inv, grid, backend, calib, visit, writer.on_block, batch_size=2)
    db = LevelDatabase.open(tmp_path / "db", inv, dense_weights(model, inv)).resident("cpu")
    assert db.manifest["bytes"] < db.manifest["full_copy_bytes"]
    for (layer, level), Q in seen.items():
        assert torch.equal(db.weight(layer, parse_level(level)), Q), (layer, level)


def test_database_kept_on_the_host_decodes_the_same_with_a_bounded_cache(tmp_path):
    model = tiny_model("llama")
    inv = Inventory.from_model(model)
    grid = parse_grid("s0.3,s0.6,w4g16")
    calib = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    LevelDatabase.build(model, inv, grid, "sparsegpt", tmp_path / "db", calib, batch_size=2)
    resident = LevelDatabase.open(tmp_path / "db", inv, dense_weights(model, inv)).resident("cpu")
    one = inv.layers[0]
    budget = 2 * one.rows * one.cols * 4  # room for two decoded weights of the first layer's size
    hosted = LevelDatabase.open(tmp_path / "db", inv, dense_weights(model, inv))
    hosted.resident("cpu", max_bytes=0, cache_bytes=budget)
    assert resident.cache_bytes == 0 and hosted.cache_bytes == budget  # a CPU decodes as it goes
    for layer in inv.layers[:3]:
        for level in grid:
            assert torch.equal(hosted.weight(layer.name, level), resident.weight(layer.name, level))
            held = sum(t.numel() * t.element_size() for t in hosted._decoded.values())
            assert held <= max(budget, layer.rows * layer.cols * 4)


def test_a_killed_build_leaves_nothing_after_the_next_start(tmp_path):
    """A build killed with -9 cannot clean up: the next build of that database removes its folder."""
    import subprocess
    import sys

    from allocator.backends.db_writer import DatabaseWriter

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f".db.tmp-{int(dead.stdout)}-abc"
    orphan.mkdir()
    (orphan / "block_0000.safetensors").write_bytes(b"half written")
    live = tmp_path / f".db.tmp-{__import__('os').getpid()}-xyz"  # a build still running in this process
    live.mkdir()
    model = tiny_model("llama")
    inv = Inventory.from_model(model)
    calib = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with DatabaseWriter(inv, parse_grid("s0.5"), "magnitude", tmp_path / "db", calib):
        assert not orphan.exists() and live.exists()


def _sparsegpt_database(tmp_path, grid: list) -> tuple:
    """A tiny Llama, its inventory and its SparseGPT database of ``grid`` at ``tmp_path/db``."""
    model = tiny_model("llama")
    inv = Inventory.from_model(model)
    calib = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    return model, inv, LevelDatabase.build(model, inv, grid, "sparsegpt", tmp_path / "db", calib, batch_size=2)


def test_the_database_stores_no_dense_weights_and_decodes_only_against_the_ones_it_was_built_from(tmp_path):
    """The model holds its dense weights: the files keep only their digests, and other weights are refused."""
    from safetensors import safe_open

    grid = parse_grid("s0.5,w4g16")
    model, inv, built = _sparsegpt_database(tmp_path, grid)
    for f in (tmp_path / "db").glob("*.safetensors"):
        with safe_open(f, framework="pt") as opened:
            assert not [k for k in opened.keys() if k.endswith("|dense")]
    dense = dense_weights(model, inv)
    layer = inv.layers[0].name
    assert torch.equal(
        LevelDatabase.open(tmp_path / "db", inv, dense).weight(layer, parse_level("dense")), dense[layer]
    )
    assert torch.equal(
        built.weight(layer, grid[0]), LevelDatabase.open(tmp_path / "db", inv, dense).weight(layer, grid[0])
    )
    with pytest.raises(AllocatorError, match="needs the model's dense weights"):
        LevelDatabase.open(tmp_path / "db", inv).weight(layer, grid[0])
    other = {**dense, layer: dense[layer].clone()}
    other[layer][0, 0] += 1  # one weight changed: the digest no longer matches
    with pytest.raises(AllocatorError, match="built from other weights"):
        LevelDatabase.open(tmp_path / "db", inv, other).resident("cpu")
    wider = {n: W.double() for n, W in dense.items()}  # the same weights in float64: stored dtype, same digest
    assert torch.equal(
        LevelDatabase.open(tmp_path / "db", inv, wider).weight(layer, grid[0]), built.weight(layer, grid[0])
    )


@pytest.mark.parametrize(
    "field,value,says",
    [("shape", [1, 2, 3], "mistypes a field"), ("shape", ["a", "b"], "mistypes a field"),
     ("shape", [3, 5], "not the model's shape"), ("dense", "float32", "mistypes a field"),
     ("dense", "int8:" + "0" * 32, "mistypes a field"), ("block", True, "mistypes a field")],
)  # fmt: skip
def test_a_hostile_manifest_entry_is_one_line_not_a_traceback(field, value, says, tmp_path):
    import json

    model, inv, _ = _sparsegpt_database(tmp_path, parse_grid("s0.5"))
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    manifest["layers"][inv.layers[0].name][field] = value
    (tmp_path / "db" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AllocatorError, match=says):
        LevelDatabase.open(tmp_path / "db", inv, dense_weights(model, inv)).resident("cpu")


def test_a_block_file_holding_a_layer_its_manifest_lacks_is_one_line(tmp_path):
    import json

    model, inv, _ = _sparsegpt_database(tmp_path, parse_grid("s0.5"))
    manifest = json.loads((tmp_path / "db" / "manifest.json").read_text())
    gone = inv.layers[0].name
    del manifest["layers"][gone]
    (tmp_path / "db" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(AllocatorError, match=f"holds {gone}, which its manifest lacks"):
        LevelDatabase.open(tmp_path / "db", dense=dense_weights(model, inv)).resident("cpu")


def test_a_cached_database_of_other_weights_is_rebuilt_for_the_model_at_hand(tmp_path, caplog):
    """Two fine-tunes of one architecture under one name share a cache entry's name: the digests tell them apart,
    so the second model's database is built again rather than decoded against the wrong weights."""
    from allocator.workspace import Calibration, Workspace

    ws, grid = Workspace(tmp_path / "cache"), parse_grid("s0.5")
    calib = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    first, second = tiny_model("llama", seed=0), tiny_model("llama", seed=1)
    inv = Inventory.from_model(first)
    cal = [Calibration(m, inv, "tuned", calib, {"calib": "random"}, 2) for m in (first, second)]
    ws.database(cal[0], grid, "sparsegpt")
    db = ws.database(cal[1], grid, "sparsegpt")
    assert "unusable" in caplog.text and "built from other weights" in caplog.text
    layer = inv.layers[0].name
    assert torch.equal(db.weight(layer, parse_level("dense")), weight_view(second.get_submodule(layer)))


def test_a_reopened_database_comes_back_with_its_parts_loaded(tmp_path):
    """Each search of a run opens the database again (the fitted search, evolution, apply): an 8B model's parts
    take a minute to read and pin, so a reopened database (its digests checked again) keeps the loaded ones, the
    last one opened only; weights it was not built from still get a rebuild (previous test)."""
    from allocator.workspace import Calibration, Workspace

    ws, grid = Workspace(tmp_path / "cache"), parse_grid("s0.5")
    model = tiny_model("llama")
    inv = Inventory.from_model(model)
    cal = Calibration(model, inv, "tiny", torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(0)),
                      {"calib": "random"}, 2)  # fmt: skip
    ws.database(cal, grid, "sparsegpt")  # built
    opened = ws.database(cal, grid, "sparsegpt").resident("cpu")
    parts = opened.parts
    again = ws.database(cal, grid, "sparsegpt")
    assert again is opened and again.resident("cpu").parts is parts  # nothing read again
    assert again.resident("cpu", max_bytes=0).parts is not parts  # asked for another placement: loaded again
    layer = inv.layers[0].name
    assert torch.equal(again.weight(layer, parse_level("dense")), weight_view(model.get_submodule(layer)))
    ws.database(cal, parse_grid("s0.3"), "sparsegpt")  # another database opened: the first one's parts are let go
    ws.database(cal, parse_grid("s0.3"), "sparsegpt")
    assert ws.database(cal, grid, "sparsegpt") is not opened


@pytest.mark.parametrize("fail_at", [0, -1])
@pytest.mark.parametrize("error", ["disk", "bug"])
def test_a_failed_block_write_in_the_background_leaves_nothing(fail_at, error, tmp_path, monkeypatch):
    """Block files are written by a thread while the next block is compressed: a failed write, the first (seen
    at the next block) or the last (seen at the end), is still one error and leaves no folder behind."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    import allocator.backends.db_writer as db_writer

    model = tiny_model("llama")
    inv = Inventory.from_model(model)
    blocks, calls = len({layer.block for layer in inv.layers}), []
    assert blocks >= 2

    def failing(tensors, path, *a, **k):
        calls.append(path)
        if len(calls) - 1 == fail_at % blocks:
            if error == "disk":
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            raise RuntimeError("a bug in the writer")
        return save_file(tensors, path, *a, **k)

    monkeypatch.setattr(db_writer, "save_file", failing)
    calib = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    expected = (AllocatorError, "could not write") if error == "disk" else (RuntimeError, "a bug in the writer")
    with pytest.raises(expected[0], match=expected[1]):
        LevelDatabase.build(model, inv, parse_grid("s0.5"), "magnitude", tmp_path / "db", calib, batch_size=2)
    assert list(tmp_path.iterdir()) == []
