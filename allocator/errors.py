"""The one exception root of allocator: the CLI prints it as one line and exits 2."""

from __future__ import annotations


class AllocatorError(Exception):
    """A user-facing error: the message states the rule, the values received and the fix."""
