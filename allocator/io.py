"""Atomic file writes: a reader never sees a half-written file, a crash leaves none behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: object) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def check_output(path: str | Path, flag: str, folder: bool = True) -> None:
    """Refuse, before any work, an output that cannot be written: a file where a folder is wanted (or the
    reverse), a file among its parents, or a parent this process may not write into."""
    from allocator.errors import AllocatorError

    path = Path(path)
    if path.exists() and folder and not path.is_dir():
        raise AllocatorError(f"{flag} {str(path)!r} is a file: pass a folder")
    if path.exists() and not folder and path.is_dir():
        raise AllocatorError(f"{flag} {str(path)!r} is a folder: pass a file path")
    parent = next((p for p in path.parents if p.exists()), Path("."))
    if not parent.is_dir():
        raise AllocatorError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a folder: pass another path")
    if not os.access(path if path.exists() else parent, os.W_OK):
        raise AllocatorError(f"{flag} {str(path)!r}: cannot write under {str(parent)!r}: pass a writable path")
