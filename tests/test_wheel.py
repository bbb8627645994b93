"""The wheel runs anywhere: built from the checkout, installed into a fresh virtualenv that sees none of the
checkout's folders, it runs the quick start from an empty folder, offline, on its own packaged texts."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_wheel_runs_the_quick_start_from_an_empty_folder(tmp_path):
    dist, fresh, empty = tmp_path / "dist", tmp_path / "venv", tmp_path / "empty"
    build = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist)]
    src = tmp_path / "src"  # setuptools builds in ./build: a copy keeps the checkout clean
    skip = shutil.ignore_patterns(".git", ".venv", "runs", "results", "build", ".gpu", ".whl", ".cache*", "*.egg-info")
    shutil.copytree(REPO, src, ignore=skip)
    subprocess.run([*build, str(src)], check=True, capture_output=True, cwd=tmp_path)
    wheel = next(dist.glob("allocator-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(fresh)], check=True)
    # the dependencies (torch, transformers, the embedded model) come from this environment's site-packages as a
    # plain path: its .pth files (the editable install of the checkout among them) are not processed there
    (fresh_site,) = fresh.glob("lib/python*/site-packages")
    (fresh_site / "deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(fresh / "bin" / "python"), "install", "-q", "--no-deps"]
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True)
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ALLOCATOR_DATA")}
    where = subprocess.run([str(fresh / "bin" / "python"), "-c", "import allocator; print(allocator.__file__)"],
                           cwd=empty, env=env, capture_output=True, text=True, check=True)  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(fresh_site) and not Path(where.stdout.strip()).is_relative_to(REPO)
    quick = [str(fresh / "bin" / "allocator"), "run", "--target", "sparsity=0.5", "--method", "uniform",
             "--calib-samples", "2", "--eval-samples", "2", "--kl-samples", "2", "--seq-len", "64",
             "-o", "out"]  # fmt: skip
    done = subprocess.run(quick, cwd=empty, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((empty / "out" / "metrics.json").read_text())
    assert metrics["achieved"]["sparsity"] == pytest.approx(0.5, abs=1e-3) and metrics["perplexity"] > 1
    config = json.loads((empty / "out" / "config.json").read_text())
    assert config["calib"] is None or "texts" in str(config["calib"]) or config["calib"] == "c4-validation-2k"
