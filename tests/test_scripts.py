"""Every benchmark script still imports: a refactor that renames what a script uses fails here, not on the GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "scripts").glob("*.py"))


@pytest.mark.parametrize("path", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_script_imports(path, monkeypatch):
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(f"script_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)  # top-level imports only: every script runs its work under __main__
    assert callable(getattr(module, "main", None)), f"{path.name} has no main()"


def test_latency_check_log_reads_back_every_plan_and_token_count(monkeypatch):
    """The committed log of issue 30's check is the table's source: every (plan, token count) line is read."""
    monkeypatch.syspath_prepend(str(SCRIPTS[0].parent))
    from latency_check_table import parse

    log = (Path(__file__).resolve().parents[1] / "results" / "latency_check_issue30.log").read_text(encoding="utf-8")
    df = parse(log)
    assert len(df) == log.count(" tokens: predicted ") and df.plan.nunique() == log.count("== ")
    first = df.iloc[0]
    assert abs(100 * (first.predicted_ms - first.measured_ms) / first.measured_ms - first.error_pct) < 0.01
    with pytest.raises(ValueError, match="no `latency check` lines"):
        parse("== plan.json\n")
