"""The Hugging Face hub, asked only when it can answer.

Offline, huggingface_hub retries every request with back-off (a minute of warnings for one unknown name).
When the hub's host cannot be reached, loads run in offline mode instead: cached names still load, others
fail at once with one line.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from urllib.parse import urlparse

_OFFLINE_VALUES = ("1", "true", "yes", "on")


@cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether ``$HF_ENDPOINT`` (default huggingface.co) accepts a connection; False in offline mode."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _OFFLINE_VALUES:
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def hub_access() -> Iterator[bool]:
    """Run hub loads online if the hub answers, else in offline mode (the local cache only); yields which."""
    online = hub_reachable()
    if online:
        yield True
        return
    import huggingface_hub.constants as constants

    before_env, before = os.environ.get("HF_HUB_OFFLINE"), constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], constants.HF_HUB_OFFLINE = "1", True
    try:
        yield False
    finally:
        constants.HF_HUB_OFFLINE = before
        if before_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = before_env


OFFLINE_HINT = "the hub cannot be reached from here and it is not in the local cache"
