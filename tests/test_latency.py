"""Latency tables on CPU: synthetic tables against closed forms, budgets held by every method, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from allocator.budget import Budget, Problem, build_problem
from allocator.cli import main
from allocator.errors import AllocatorError
from allocator.inventory import Inventory
from allocator.latency.kernels import kernel_for
from allocator.latency.measure import Timer, check_plans, measure_table
from allocator.latency.table import COLUMNS, MIN_MS, LatencyModel, LatencyTable
from allocator.levels import Level, parse_grid, parse_level
from allocator.plan import Plan
from tests.conftest import ToyFitness, search, tiny_model

TOKENS = (1, 4, 16, 512, 2048)
# synthetic per-kernel time = A * rows * cols * tokens**B (a power law: log-log interpolation is exact)
SPEED = {"dense": 1.0, "2:4-cusparselt": 0.7, "int4wo-g32": 0.4, "int8wo": 0.6}
B = 0.5


def synthetic(inv: Inventory, runs: dict[str, bool] | None = None, overhead: float = 0.02) -> LatencyTable:
    """A table for every shape of ``inv`` whose times follow a known formula."""
    rows = []
    for r, c in {(lay.rows, lay.cols) for lay in inv.layers}:
        for kernel, speed in SPEED.items():
            ok = (runs or {}).get(kernel, True)
            for m in TOKENS:
                ms = 1e-6 * r * c * m**B * (speed if ok else 1.0)
                rows.append({"kind": "linear", "rows": r, "cols": c, "kernel": kernel, "tokens": m, "ms": ms,
                             "runs": ok, "serving": ""})  # fmt: skip
    for m in TOKENS:
        rows.append({"kind": "overhead", "rows": 0, "cols": 0, "kernel": "non-linear", "tokens": m,
                     "ms": overhead * m**B, "runs": True, "serving": ""})  # fmt: skip
    df = pd.DataFrame(rows).assign(gpu="synthetic", driver="none", torch="none")
    return LatencyTable(df[COLUMNS], {"model": "tiny", "sparse24": "cusparselt"}, "synthetic table")


def expected_ms(inv: Inventory, assignment: dict[str, Level], m: float, overhead: float = 0.02) -> float:
    """The closed form the synthetic table was built from (float64 reference)."""
    total = overhead * m**B
    for lay in inv.layers:
        speed = SPEED.get(kernel_for(assignment[lay.name]), 1.0)
        total += 1e-6 * lay.rows * lay.cols * m**B * speed
    return total


@pytest.fixture(scope="module")
def inv() -> Inventory:
    return Inventory.from_model(tiny_model("llama"))


def test_lookup_is_exact_at_measured_points_and_interpolates_power_laws(inv):
    table = synthetic(inv)
    grid = parse_grid("dense,s0.5,2:4,w4g32,w8,w3")
    rng = np.random.default_rng(0)
    for m in (*TOKENS, 2, 7, 100, 1000, 1500):  # measured and in-between token counts
        plan = {lay.name: grid[k] for lay, k in zip(inv.layers, rng.integers(len(grid), size=len(inv.layers)),
                                                    strict=True)}  # fmt: skip
        assert table.predict(plan, inv, m)["predicted_ms"] == pytest.approx(expected_ms(inv, plan, m), rel=1e-9)
    dense = {lay.name: Level() for lay in inv.layers}
    assert table.predict(dense, inv, 8)["speedup"] == pytest.approx(1.0)
    two_four = {lay.name: parse_level("2:4") for lay in inv.layers}
    assert table.predict(two_four, inv, 8)["speedup"] > 1


def test_piecewise_interpolation_between_non_power_law_points(inv):
    """Between two measured counts the time follows the straight line in log-log space."""
    table = synthetic(inv)
    lay = inv.layers[0]
    df = table.df
    sel = (df.kind == "linear") & (df.rows == lay.rows) & (df.cols == lay.cols) & (df.kernel == "dense")
    df.loc[sel & (df.tokens == 16), "ms"] = 3.0
    df.loc[sel & (df.tokens == 512), "ms"] = 12.0
    table = LatencyTable(df, table.meta)
    m = 90
    t = (np.log(m) - np.log(16)) / (np.log(512) - np.log(16))
    assert table.linear_ms(lay.rows, lay.cols, Level(), m) == pytest.approx(
        np.exp((1 - t) * np.log(3) + t * np.log(12))
    )


def test_levels_without_a_kernel_cost_dense(inv):
    table = synthetic(inv, runs={"2:4-cusparselt": False})
    lay = inv.layers[0]
    dense = table.linear_ms(lay.rows, lay.cols, Level(), 16)
    for name in ("s0.5", "4:8", "w3g128", "2:4", "s0.5+w4g32"):  # no kernel, or a kernel that did not run here
        assert table.linear_ms(lay.rows, lay.cols, parse_level(name), 16) == pytest.approx(dense)
    assert table.linear_ms(lay.rows, lay.cols, parse_level("w4g32"), 16) < dense
    assert table.kernel(parse_level("2:4"), lay.rows, lay.cols) == "dense"


def test_missing_shape_and_out_of_range_tokens_are_clear_errors(inv):
    table = synthetic(inv)
    with pytest.raises(AllocatorError, match=r"layer shape 100x200 .*allocator latency measure"):
        table.linear_ms(100, 200, Level(), 4)
    lay = inv.layers[0]
    with pytest.raises(AllocatorError, match=r"4096 tokens is outside the measured range 1\.\.2048"):
        table.linear_ms(lay.rows, lay.cols, Level(), 4096)
    with pytest.raises(AllocatorError, match="needs a latency table"):
        build_problem(inv, parse_grid("dense,2:4"), Budget.parse("speedup=1.2"))
    with pytest.raises(AllocatorError, match="speedup must be >= 1"):
        Budget.parse("speedup=0.5")


def _latency_problem(inv: Inventory, budget: str, extra: list[Budget] | None = None):
    table = synthetic(inv)
    grid = parse_grid("dense,s0.3,s0.5,2:4,w8,w4g32")
    latency = LatencyModel(table, 16)
    problem = build_problem(inv, grid, Budget.parse(budget), extra=extra, latency=latency)
    rng = np.random.default_rng(1)
    quality = np.array([0.0, 0.2, 0.5, 0.6, 0.05, 0.3])
    error = rng.uniform(0.5, 2.0, size=(len(problem.units), 1)) * quality[None, :]
    problem = problem.with_sensitivity(error, rng.uniform(0, 1, size=len(problem.units)))
    return problem, table, latency


@pytest.mark.parametrize("budget", ["speedup=1.5", "latency=LIMIT"])
@pytest.mark.parametrize("method", ["uniform", "knapsack", "evolution", "optuna"])
def test_latency_budgets_hold_for_every_method(inv, method, budget, tmp_path):
    table = synthetic(inv)
    dense = table.dense_ms(inv, 16)
    budget = budget.replace("LIMIT", str(0.7 * dense))
    problem, table, _ = _latency_problem(inv, budget)
    options = {"evolution": {"generations": 4, "offspring": 3, "stages": "1@64"},
               "optuna": {"trials": 6, "storage": str(tmp_path / "study.journal")}}.get(method, {})  # fmt: skip
    choice = search(method, problem, 0, ToyFitness(problem), **options).choice
    assert problem.feasible(choice)
    predicted = table.predict(problem.assignment(choice), inv, 16)
    target = Budget.parse(budget)
    if target.kind == "speedup":
        assert predicted["speedup"] >= target.value * (1 - 1e-9)
    else:
        assert predicted["predicted_ms"] <= target.value * (1 + 1e-9)


def test_owl_holds_a_latency_budget_beside_its_sparsity(inv):
    """OWL allocates sparsity; a latency budget rides along as an extra constraint."""
    table = synthetic(inv)
    limit = 0.8 * table.dense_ms(inv, 16)
    problem, table, _ = _latency_problem(inv, "sparsity=0.3", extra=[Budget("latency", limit)])
    choice = search("owl", problem, 0).choice
    assert problem.feasible(choice)
    assert table.predict(problem.assignment(choice), inv, 16)["predicted_ms"] <= limit * (1 + 1e-9)


def test_knapsack_matches_brute_force_under_a_latency_budget():
    """A 3-unit problem: the knapsack's plan is the exhaustive optimum under the latency limit."""
    import itertools

    inv = Inventory.from_model(tiny_model("llama"))
    problem, _, _ = _latency_problem(inv, "speedup=1.3")
    keep = [0, 3, 6]  # three units; the others fixed at their cheapest level
    rest = problem.cost.min(axis=1)
    limit = problem.limit - sum(rest[u] for u in range(len(problem.units)) if u not in keep)
    sub = Problem([problem.units[u] for u in keep], problem.levels, problem.cost[keep], limit,
                  budget=Budget("latency", 1.0), sensitivity=problem.sensitivity[keep])  # fmt: skip
    rows = np.arange(3)
    fits = [c for c in itertools.product(range(len(problem.levels)), repeat=3) if sub.cost[rows, c].sum() <= limit]
    best = min(fits, key=lambda c: sub.sensitivity[rows, c].sum())
    got = search("knapsack", sub, 0).choice
    assert sub.sensitivity[np.arange(3), got].sum() == pytest.approx(sub.sensitivity[np.arange(3), list(best)].sum())


def test_measure_on_cpu_writes_a_complete_table_and_checks_plans(inv, tmp_path):
    """The measuring code runs anywhere; kernels without a CPU path are marked and cost dense time."""
    model = tiny_model("llama")
    timer = Timer("cpu", repeats=3, warmup=1)
    table = measure_table(model, inv, (1, 8), ("dense", "2:4-cusparselt", "rows0.5"), timer,
                          env={"gpu": "cpu", "driver": "none", "torch": "x"})  # fmt: skip
    table.save(tmp_path / "t.csv")
    back = LatencyTable.load(tmp_path / "t.csv")
    assert set(back.df.kernel) == {"dense", "2:4-cusparselt", "rows0.5", "non-linear"}
    sparse = back.df[back.df.kernel == "2:4-cusparselt"]
    assert not sparse.runs.any() and "no kernel here" in sparse.serving.iloc[0]
    dense = back.df[back.df.kernel == "dense"].set_index(["rows", "cols", "tokens"]).ms
    assert np.allclose(sparse.set_index(["rows", "cols", "tokens"]).ms.loc[dense.index], dense)
    assert len(back.df) == len(back.shapes()) * 3 * 2 + 2
    plans = {
        "dense": {lay.name: Level() for lay in inv.layers},
        "2:4": {lay.name: parse_level("2:4") for lay in inv.layers},
    }
    rows = check_plans(model, inv, back, plans, (8,), timer)
    assert [r["plan"] for r in rows] == ["dense", "2:4"]
    assert all(r["kernels"] == f"dense:{len(inv.layers)}" and r["measured_ms"] > 0 for r in rows)


def test_cli_measure_predict_check_on_cpu(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "lat"
    argv = ["latency", "measure", "--model", str(tiny_model_dir), "--device", "cpu", "--tokens", "1,8",
            "--kernels", "dense,int4wo-g32", "--repeats", "3", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    (table_path,) = out.glob("*/*.csv")
    meta = json.loads(table_path.with_suffix(".json").read_text())
    assert meta["gpu"].startswith("cpu") and meta["torch"] and meta["model"] == str(tiny_model_dir)
    model = tiny_model("llama")
    inv = Inventory.from_model(model)
    grid = parse_grid("dense,w4g32")
    plan = Plan.create({lay.name: grid[1] for lay in inv.layers}, inv, "tiny", Budget.parse("bits=16"), grid, "x", 0)
    plan.save(tmp_path / "plan.json")
    capsys.readouterr()
    assert main(["latency", "predict", str(tmp_path / "plan.json"), "--table", str(table_path), "--tokens", "1,4"]) == 0
    printed = capsys.readouterr().out
    assert "4 tokens: predicted" in printed and "speed-up 1.000x" in printed  # int4 has no CPU kernel: dense
    check = ["latency", "check", str(tmp_path / "plan.json"), "--table", str(table_path), "--device", "cpu",
             "--repeats", "3", "--tokens", "1,8", "--out", str(tmp_path / "checks.csv")]  # fmt: skip
    assert main(check) == 0 and main(check) == 0  # two checks: their rows gathered in one CSV
    printed = capsys.readouterr().out
    assert "measured" in printed and "added 2 rows" in printed
    rows = pd.read_csv(tmp_path / "checks.csv")
    assert len(rows) == 4 and list(rows.tokens) == [1, 8, 1, 8] and set(rows.plan) == {str(tmp_path / "plan.json")}
    assert (rows.measured_ms > 0).all() and np.allclose(
        rows.error_pct, 100 * (rows.predicted_ms - rows.measured_ms) / rows.measured_ms
    )
    assert main([*check[:-1], str(tmp_path)]) == 2  # a folder where the CSV goes: one line, before any work
    assert "is a folder: pass a file path" in capsys.readouterr().err
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")  # someone else's CSV: refused before measuring, left whole
    assert main([*check[:-1], str(tmp_path / "other.csv")]) == 2
    assert "holds no `latency check` rows" in capsys.readouterr().err
    assert (tmp_path / "other.csv").read_text() == "a,b\n1,2\n"
    assert main(["latency", "predict", str(tmp_path / "plan.json"), "--table", str(table_path), "--tokens", "64"]) == 2
    assert "outside the measured range" in capsys.readouterr().err
    assert main(["latency", "predict", str(tmp_path / "plan.json"), "--table", str(tmp_path / "nope.csv")]) == 2
    assert "allocator latency measure" in capsys.readouterr().err
    # a table measured where int4 ran, checked on a CPU that cannot run it: one line, not a traceback
    gpu = LatencyTable.load(table_path)
    gpu.df.loc[gpu.df.kernel == "int4wo-g32", "runs"] = True
    gpu.meta["gpu"] = "NVIDIA H100 80GB HBM3"
    gpu.save(tmp_path / "gpu" / "t.csv")
    argv = ["latency", "check", str(tmp_path / "plan.json"), "--table", str(tmp_path / "gpu" / "t.csv"), "--device",
            "cpu", "--repeats", "1"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.rsplit("\r", 1)[-1]  # after the progress bar
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "ran int4wo-g32 on NVIDIA H100 80GB HBM3, this device cannot" in err and "run the check on that GPU" in err


def test_optuna_pareto_front_of_fitness_and_latency(inv, tmp_path):
    problem, table, _ = _latency_problem(inv, "latency=1e9")  # no binding limit: the front spans the grid
    found = search("optuna", problem, 0, ToyFitness(problem), trials=24, sampler="nsga2",
                   objectives="fitness,latency", storage=str(tmp_path / "s.journal"))  # fmt: skip
    points = [(p["fitness"], problem.summed(problem.latency_cost, p["choice"])) for p in found.front]
    assert len(points) >= 2
    for a in points:  # no front point is dominated by another
        assert not any(b[0] <= a[0] and b[1] <= a[1] and b != a for b in points)
    without = replace(problem, latency_cost=None)
    with pytest.raises(AllocatorError, match=r"optuna needs a latency table \(--latency-table\)"):
        search("optuna", without, 0, ToyFitness(problem), trials=2, objectives="fitness,latency")


def test_plans_at_a_latency_limit_are_feasible_for_optuna_too(inv, tmp_path):
    """Real-valued costs sum with float noise: optuna must judge feasibility as Problem.feasible does."""
    problem, _, _ = _latency_problem(inv, "speedup=1")
    flat = np.repeat(problem.cost[:, :1], problem.cost.shape[1], axis=1)  # every level costs dense time
    # every plan sits at the limit, a hair under: summation noise, not an overshoot
    problem = replace(problem, cost=flat, latency_cost=flat, limit=flat[:, 0].sum() * (1 - 1e-14))
    assert problem.feasible(np.zeros(len(problem.units), dtype=int))
    found = search("optuna", problem, 0, ToyFitness(problem), trials=6, sampler="nsga2",
                   objectives="fitness,latency", storage=str(tmp_path / "s.journal"))  # fmt: skip
    assert found.front


def test_a_noisy_negative_overhead_predicts_finite_times(inv):
    """Linears timed one by one can outweigh the whole model on a busy host: the prediction stays finite."""
    table = synthetic(inv)
    df = table.df
    df.loc[(df.kind == "overhead") & (df.tokens == 4), "ms"] = -0.01
    table = LatencyTable(df, table.meta)
    dense = {lay.name: Level() for lay in inv.layers}
    for m in (1, 2, 4, 8):
        out = table.predict(dense, inv, m)
        assert np.isfinite(out["predicted_ms"]) and out["speedup"] == pytest.approx(1.0)
    assert 0 < table.overhead_ms(4) < 1e-5


def _binomial_expectation(p: float, m: int, ms_at) -> float:
    """Exact E[t(n) 1(n > 0)] for an expert's routed tokens n ~ Binomial(m, p) (float64 reference)."""
    from math import comb

    return sum(comb(m, n) * p**n * (1 - p) ** (m - n) * ms_at(n) for n in range(1, m + 1))


def test_routed_experts_are_priced_at_the_tokens_routed_to_them():
    """An expert (2 of 4 per token) costs its expected time over the binomial routing: exact at one token,
    within Jensen's gap of the concave power law at more."""
    inv = Inventory.from_model(tiny_model("mixtral"))
    experts = [lay for lay in inv.layers if ".experts." in lay.name]
    assert experts and all(lay.share == 0.5 for lay in experts)
    table = synthetic(inv)
    for m, rel in ((1, 1e-12), (16, 0.02), (512, 1e-3)):
        for lay in experts[:2]:
            exact = _binomial_expectation(0.5, m, lambda n, lay=lay: 1e-6 * lay.rows * lay.cols * n**B)
            assert table.layer_ms(lay, Level(), m) == pytest.approx(exact, rel=rel)
    dense = {lay.name: Level() for lay in inv.layers}
    full = sum(1e-6 * lay.rows * lay.cols * 512**B for lay in inv.layers if lay.share == 1)
    routed = sum(table.layer_ms(lay, Level(), 512) for lay in experts)
    assert routed < sum(1e-6 * lay.rows * lay.cols * 512**B for lay in experts) * 0.75  # not priced as dense
    assert table.predict(dense, inv, 512)["predicted_ms"] == pytest.approx(0.02 * 512**B + full + routed, rel=1e-12)


def test_measured_moe_table_holds_expert_token_counts_and_predicts_dense_exactly():
    model = tiny_model("mixtral")
    inv = Inventory.from_model(model)
    table = measure_table(model, inv, (1, 8), ("dense",), Timer("cpu", repeats=3, warmup=1),
                          env={"gpu": "cpu", "driver": "none", "torch": "x"})  # fmt: skip
    assert sorted(set(table.df[table.df.kind == "linear"].tokens)) == [1, 4, 8]  # 8 tokens: 4 per active expert
    for m in (1, 8):
        note = table.df[(table.df.kind == "overhead") & (table.df.tokens == m)].serving.iloc[0]
        measured, linears = float(note.split()[1]), float(note.split()[4])  # "dense X ms, linears Y ms, ..."
        linear = table.dense_ms(inv, m) - table.overhead_ms(m)  # the layers as the table prices them
        assert linear == pytest.approx(linears, abs=1e-4)  # the overhead was taken off expert-priced layers
        # dense = overhead + layers exactly, unless timing noise made the layers outweigh the whole model
        assert table.overhead_ms(m) == pytest.approx(max(measured - linears, MIN_MS), abs=2e-4)
