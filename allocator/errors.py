"""The one exception root of allocator: the CLI prints it as one line and exits 2."""

from __future__ import annotations


class AllocatorError(Exception):
    """A user-facing error: the message states the rule, the values received and the fix."""


def first_line(exc: BaseException, limit: int | None = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters (its type's name when it has no
    message): what a one-line error quotes."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__
