"""Checks of what files people share hold (plans, run folders, tables): they are untrusted input.

A layer name reaches regexes, YAML, CSV and shell scripts that other tools execute; a number reaches budgets and
JSON. Each is checked once, where the file is read or the plan is built, so every writer downstream can rely on
the grammar instead of escaping for its own syntax alone (they still escape: two locks, not one).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from allocator.errors import AllocatorError

# what torch's named_modules() yields: dot-separated attribute names (identifiers, or digits for list items)
MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_TEXT = 4096  # longer strings in a plan are not names of anything
MAX_DEPTH = 16  # plans nest four levels deep; a deeper file is hostile or broken
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # spreadsheets run cells that start with these


def check_names(names: Iterable[object], source: str, what: str = "layer names") -> None:
    """Refuse names that are not module names (a newline, a regex, a quote), naming every one of them."""
    bad = [n for n in names if not (isinstance(n, str) and len(n) <= MAX_TEXT and MODULE_NAME.fullmatch(n))]
    if bad:
        shown = ", ".join(repr(n)[:80] for n in bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise AllocatorError(f"{source}: {len(bad)} {what} are not module names like model.layers.0.mlp.down_proj "
                             f"({shown}): the file was edited or is not from allocator; re-create it")  # fmt: skip


def check_text(value: object, field: str, source: str) -> str:
    """A string field: no control characters (a newline would start a new YAML key or CSV row), bounded length."""
    if not isinstance(value, str) or len(value) > MAX_TEXT or _CONTROL.search(value):
        raise AllocatorError(f"{source}: field {field} must be one line of text, got {repr(value)[:80]}: re-create it")
    return value


def check_finite(value: object, field: str, source: str) -> float:
    """A number field: a real, finite number (JSON has no Infinity; a budget of inf is no budget)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AllocatorError(f"{source}: field {field} must be a finite number, got {repr(value)[:80]}")
    return float(value)


def check_tree(value: object, field: str, source: str, depth: int = 0) -> None:
    """Nested JSON data (timings, achieved, data sources): finite numbers, one-line texts, bounded depth."""
    if depth > MAX_DEPTH:
        raise AllocatorError(f"{source}: field {field} nests deeper than {MAX_DEPTH} levels: re-create the file")
    if isinstance(value, dict):
        for key, item in value.items():
            check_text(key, f"{field} key", source)
            check_tree(item, f"{field}.{key}", source, depth + 1)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_tree(item, f"{field}[{i}]", source, depth + 1)
    elif isinstance(value, str):
        check_text(value, field, source)
    elif isinstance(value, int | float) and not isinstance(value, bool):
        check_finite(value, field, source)
    elif value is not None and not isinstance(value, bool):
        raise AllocatorError(f"{source}: field {field} holds a {type(value).__name__}, not JSON data")


def check_count(value: object, field: str, source: str, low: int = 0, high: int = 2**40) -> int:
    """An integer field in range (a shape, a seed, a sample count): not a string, float or bool."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise AllocatorError(f"{source}: field {field} must be an integer in [{low}, {high}], got {repr(value)[:80]}")
    return value


def cell(value: object) -> object:
    """A CSV cell a spreadsheet will not execute: text starting with = + - @ gets a leading quote (OWASP)."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value
