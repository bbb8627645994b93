"""Atomic file writes: a reader never sees a half-written file, a crash leaves none behind."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError


@contextmanager
def atomic_path(path: str | Path, folder: bool = False) -> Iterator[Path]:
    """A temporary file (or folder) beside ``path``, moved onto it when the block ends without error.

    Its name holds this process's id, so a later write of ``path`` removes what a killed process left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    prefix = f".{path.name}.tmp-{os.getpid()}-"
    if folder:
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix))
    else:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix)
        os.close(fd)
        tmp = Path(name)
    os.chmod(tmp, (0o777 if folder else 0o666) & ~_umask())  # mkstemp's 0600: the result is shared like any file
    try:
        yield tmp
        if folder and path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as exc:  # a full disk, a read-only folder, a name too long: one line
        raise write_error(path, exc) from None
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_error(path: Path, exc: BaseException):
    """The one-line error for a failed write of ``path`` (the temporary is removed by the caller)."""
    from allocator.errors import AllocatorError, first_line

    why = getattr(exc, "strerror", None) or first_line(exc, None)
    fixes = {errno.ENOSPC: "free space or pass a folder on a larger disk (--cache-dir, --output-dir)",
             errno.EROFS: "pass a writable folder", errno.EACCES: "pass a folder you may write into",
             errno.ENAMETOOLONG: "pass a shorter path"}  # fmt: skip
    fix = fixes.get(getattr(exc, "errno", None), "free space or pass another folder")
    if "No space" in str(exc) or "I/O error" in str(exc):
        fix = fixes[errno.ENOSPC]
    return AllocatorError(f"could not write {path} ({why}): {fix}; nothing was left behind")


def check_space(path: str | Path, needed: int, what: str, fixes: str) -> None:
    """Refuse, before the work, an artifact of ``needed`` bytes that the filesystem holding ``path`` cannot take."""
    from allocator.errors import AllocatorError

    parent = next((p for p in Path(path).absolute().parents if p.exists()), Path("."))
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise AllocatorError(f"{what} needs about {needed / 1e9:.1f} GB at {path}, {free / 1e9:.1f} GB are free: "
                             f"{fixes}")  # fmt: skip


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_orphans(path: Path) -> None:
    """Delete temporary files and folders of writes of ``path`` whose process is gone."""
    for tmp in path.parent.glob(f".{path.name}.tmp-*"):
        pid = tmp.name.removeprefix(f".{path.name}.tmp-").split("-", 1)[0]
        if not pid.isdigit() or not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` so that a reader never sees half of it."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: str | Path, obj: object) -> None:
    """Write ``obj`` as indented, strict JSON, atomically: an infinite or undefined number (the perplexity of a
    destroyed model) is written as null, never as the ``Infinity``/``NaN`` other JSON readers reject."""
    write_text_atomic(path, json.dumps(strict(obj), indent=2, sort_keys=False, allow_nan=False) + "\n")


def strict(obj: object) -> object:
    """``obj`` with every non-finite float replaced by None (JSON has no Infinity or NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict(v) for v in obj]
    return obj


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
