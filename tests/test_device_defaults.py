"""What a run leaves open is decided by its device — the sensitivity (the Fisher prior alone on a CPU, fitted on
a GPU) and what the fitted search measures — said once, and never over what the user passed."""

from __future__ import annotations

import logging

from allocator.search.fitted import CPU_FIT, GPU_FIT
from allocator.spec import RunConfig, device_defaults, resolve


def test_a_cpu_knapsack_uses_the_fisher_prior_alone_and_says_so_once(caplog, monkeypatch):
    monkeypatch.setattr("allocator.spec._SAID", [])
    with caplog.at_level(logging.INFO, logger="allocator.spec"):
        spec = resolve(RunConfig(method="knapsack", target="sparsity=0.5"))
        resolve(RunConfig(method="knapsack", target="sparsity=0.6"))
    assert (spec.sensitivity, spec.config.sensitivity, spec.fitter) == ("fisher", "fisher", None)
    assert {"fitted", "database"}.isdisjoint(spec.needs)  # no level database, no measured plans
    said = [r.getMessage() for r in caplog.records if "default sensitivity is the Fisher prior" in r.getMessage()]
    assert len(said) == 1 and "--sensitivity fitted" in said[0]


def test_a_cpu_run_that_asks_for_the_fit_measures_less_and_says_so_once(caplog, monkeypatch):
    monkeypatch.setattr("allocator.spec._SAID", [])
    with caplog.at_level(logging.INFO, logger="allocator.spec"):
        spec = resolve(RunConfig(method="knapsack", target="sparsity=0.5", sensitivity="fitted"))
        resolve(RunConfig(method="knapsack", target="sparsity=0.6", sensitivity="fitted"))
    assert spec.sensitivity == "fitted" and spec.config.fit_seqs == CPU_FIT["fit_seqs"]
    assert (spec.fitter.fit_plans, spec.fitter.fit_rounds) == (CPU_FIT["fit_plans"], CPU_FIT["fit_rounds"])
    said = [r.getMessage() for r in caplog.records if "on a CPU the fitted sensitivity" in r.getMessage()]
    assert len(said) == 1 and "--fit-plans" in said[0]


def test_a_gpu_run_keeps_the_full_fit_and_explicit_settings_win():
    gpu = device_defaults(RunConfig(method="knapsack", device="cuda"))
    assert gpu.sensitivity == "fitted" and device_defaults(RunConfig(sensitivity="error")).sensitivity == "error"
    assert gpu.fit_seqs == GPU_FIT["fit_seqs"] and gpu.options["fit_plans"] == GPU_FIT["fit_plans"]
    mine = device_defaults(RunConfig(method="knapsack", fit_seqs=5, options={"fit_plans": 7, "fit_rounds": 0}))
    assert (mine.fit_seqs, mine.options["fit_plans"], mine.options["fit_rounds"]) == (5, 7, 0)


def test_a_method_that_needs_no_fit_is_not_told_about_it(caplog, monkeypatch):
    monkeypatch.setattr("allocator.spec._SAID", [])
    with caplog.at_level(logging.INFO, logger="allocator.spec"):
        resolve(RunConfig(method="uniform"))
    assert not [r for r in caplog.records if "fitted sensitivity" in r.getMessage()]
