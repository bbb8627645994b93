"""What this allocator is: its version, and the versions a run records beside its results."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

__version__ = "0.2.0"


def versions() -> dict[str, str]:
    """allocator, torch, transformers, Python and the git commit of the source (empty outside a checkout)."""
    import torch
    import transformers

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        sha = ""
    return {"allocator": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "git_sha": sha}  # fmt: skip
