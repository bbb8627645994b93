"""Large artifacts on a small disk: checked before the work, one line and nothing left when a write fails, and the
level database is the backend's own output (apply from it equals re-running the backend, bit for bit)."""

from __future__ import annotations

import shutil
from collections import namedtuple

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

import allocator.backends.db_writer
import allocator.io
from allocator.backends import get_backend
from allocator.backends.database import LevelDatabase
from allocator.backends.db_files import estimate_bytes
from allocator.cli import main
from allocator.inventory import Inventory
from allocator.levels import parse_grid, with_dense
from tests.conftest import VOCAB, tiny_model
from tests.test_cli import _args

Usage = namedtuple("Usage", "total used free")


def _files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*")) if folder.exists() else []


def test_a_database_the_disk_cannot_hold_is_refused_before_the_pass(tiny_model_dir, text_files, tmp_path, capsys,
                                                                    monkeypatch):  # fmt: skip
    monkeypatch.setattr(allocator.io.shutil, "disk_usage", lambda _p: Usage(10**9, 10**9 - 5000, 5000))
    passes = []
    monkeypatch.setattr(LevelDatabase, "build", lambda *a, **k: passes.append(1))
    cache = tmp_path / "cache"
    argv = _args(tiny_model_dir, text_files, tmp_path / "run", "--method", "evolution", "--generations", "1",
                 "--backend", "sparsegpt", "--cache-dir", str(cache))  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the level database of 10 levels needs about") and "0.0 GB are free" in err
    assert "--cache-dir" in err and "fewer levels" in err
    assert not passes and not (cache / "db").exists() and not (tmp_path / "run").exists()


def test_an_io_error_while_writing_the_database_is_one_line_and_leaves_nothing(tiny_model_dir, text_files, tmp_path,
                                                                                capsys, monkeypatch):  # fmt: skip
    real, written = allocator.backends.db_writer.save_file, []

    def fill_the_disk(tensors, path, *a, **k):
        if written:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        written.append(path)
        real(tensors, path, *a, **k)

    monkeypatch.setattr(allocator.backends.db_writer, "save_file", fill_the_disk)
    cache = tmp_path / "cache"
    argv = _args(tiny_model_dir, text_files, tmp_path / "run", "--method", "evolution", "--generations", "1",
                 "--cache-dir", str(cache))  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1 and "Traceback" not in "\n".join(err)
    assert "could not write" in err[-1] and "free space or pass a folder on a larger disk" in err[-1]
    assert written and not list((cache / "db").rglob("*.safetensors")) and not (tmp_path / "run").exists()


def test_apply_from_the_database_equals_rerunning_the_backend_bit_for_bit(tiny_model_dir, text_files, tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    argv = _args(tiny_model_dir, text_files, run, "--method", "evolution", "--generations", "2", "--offspring", "2",
                 "--stages", "1@32", "--backend", "sparsegpt", "--levels", "0:0.8:0.2,w4g32,s0.5+w4g32",
                 "--target", "bits=9", "--cache-dir", str(cache))  # fmt: skip
    assert main(argv) == 0
    assert list((cache / "db").rglob("manifest.json"))  # the search's database is in the cache
    from_db, rerun = tmp_path / "from_db", tmp_path / "rerun"
    assert main(["apply", str(run / "plan.json"), "-o", str(from_db), "--checkpoint", "hf",
                 "--cache-dir", str(cache)]) == 0  # fmt: skip
    assert main(["apply", str(run / "plan.json"), "-o", str(rerun), "--checkpoint", "hf",
                 "--cache-dir", str(tmp_path / "empty")]) == 0  # fmt: skip
    assert not (tmp_path / "empty" / "db").exists()
    a, b = load_file(from_db / "model.safetensors"), load_file(rerun / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "backend,dtype",
    [("wanda", torch.float32), ("sparsegpt", torch.float32), ("gptq", torch.float32), ("sparsegpt", torch.bfloat16),
     ("sparsegpt", torch.float16), ("rtn", torch.bfloat16), ("rtn", torch.float16)],
)  # fmt: skip
def test_the_size_estimate_is_on_the_high_side_of_the_built_database(backend, dtype, tmp_path):
    model = tiny_model("llama").to(dtype)
    inv = Inventory.from_model(model)
    calib = torch.randint(VOCAB, (4, 32), generator=torch.Generator().manual_seed(0))
    # GGUF types have no codes on a grid: a codebook, or a mask and the values where that is smaller
    grid = with_dense(parse_grid("0:0.9:0.1,2:4,w4g32,w8,s0.5+w4g32,drop,q4_0,q8_0"))
    db = LevelDatabase.build(model, inv, grid, backend, tmp_path / "db", calib, batch_size=2)
    built = sum(f.stat().st_size for f in (tmp_path / "db").glob("*.safetensors"))
    estimate = estimate_bytes(inv, grid, not get_backend(backend).hessian, dtype)  # nested: no Hessian
    assert built <= estimate <= 3 * built, (built, estimate, db.manifest["bytes"])
    shutil.rmtree(tmp_path / "db")
