"""Every searcher: its options declared fully, the budget kept, same seed -> same plan, never worse than
uniform on the proxy where it minimises it. A searcher added to the registry gets all of it."""

from __future__ import annotations

import pytest

from allocator.search import SEARCHERS, option_fields
from tests.conftest import CONTRACT_OPTIONS, check_options_declared, check_searcher_contract


@pytest.mark.parametrize("method", sorted(SEARCHERS))
@pytest.mark.parametrize("target", ["sparsity=0.5", "sparsity=0.7", "bits=4.5"])
def test_contract(method, target):
    if method == "owl" and target.startswith("bits"):
        pytest.skip("OWL allocates sparsity only (tested to refuse bits)")
    check_searcher_contract(method, target, CONTRACT_OPTIONS.get(method, {}))


@pytest.mark.parametrize("method", sorted(SEARCHERS))
def test_options_are_declared(method):
    check_options_declared(method)


def test_methods_sharing_an_option_agree_on_it():
    for name, (f, methods) in option_fields().items():
        for method in methods:
            mine = next(g for g in SEARCHERS[method].options() if g.name == name)
            assert (mine.default, mine.metadata["kind"]) == (f.default, f.metadata["kind"]), (name, methods)
