"""Exporters: a plan into the files other toolkits take (``allocator export PLAN --to FORMAT``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from allocator.errors import AllocatorError
from allocator.export import autoround, gptqmodel, llamacpp, llmcompressor, tabular
from allocator.io import write_text_atomic
from allocator.plan import Plan

EXPORTERS: dict[str, Callable[..., dict[str, str]]] = {
    "llmcompressor": llmcompressor.export,
    "gptqmodel": gptqmodel.export,
    "autoround": autoround.export,
    "llamacpp": llamacpp.export,
    "json": lambda plan, backend=None: tabular.to_json(plan),
    "csv": lambda plan, backend=None: tabular.to_csv(plan),
}


def export(
    plan: Plan, fmt: str, out: str | Path, backend: str | None = None, base: str | Path | None = None
) -> list[Path]:
    """Write the files of ``fmt`` for ``plan`` into ``out`` (nothing is written if the plan is refused).

    ``base``: a folder ``out`` lies in that came with the plan (a shared run folder): no folder from it down to
    ``out`` may be a symbolic link, which would send the files outside it."""
    if fmt not in EXPORTERS:
        raise AllocatorError(f"unknown export format {fmt!r}: choose one of {', '.join(EXPORTERS)}")
    files = EXPORTERS[fmt](plan, backend)
    out = Path(out)
    inside = [out, *out.parents[: len(out.relative_to(base).parts) - 1]] if base is not None else [out]
    for folder in inside:
        if folder.is_symlink():
            raise AllocatorError(f"{folder} is a symbolic link (to {os.readlink(folder)}): exports are not written "
                                 "through links; remove it or pass --output-dir")  # fmt: skip
    paths = []
    for name, text in files.items():
        write_text_atomic(Path(out) / name, text)
        paths.append(Path(out) / name)
    return paths
