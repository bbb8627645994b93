"""A level kind added in one place gets parsing, pricing, every backend, the level database, the latency fallback,
JSON/CSV export, runs end to end, and a one-line refusal naming every layer from each exporter that cannot take it:
nothing else is edited (the registry is patched for this test only)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import pytest
import torch

from allocator.backends import BACKENDS, compress_weight
from allocator.backends.codec import decode, encode_layer
from allocator.backends.stats import LayerStats
from allocator.budget import Budget, build_problem
from allocator.cli import main
from allocator.errors import AllocatorError
from allocator.export import EXPORTERS
from allocator.formats import storage_bits
from allocator.inventory import Inventory
from allocator.latency.kernels import kernel_for
from allocator.levels import KINDS, WeightFormat, parse_grid, parse_level
from allocator.plan import Plan
from tests.conftest import tiny_model
from tests.test_cli import _args


@dataclass(frozen=True)
class Ternary(WeightFormat):
    """``tern<group>``: each group of input columns stores -1/0/+1 (2-bit codes) times one fp16 scale (TWN's rule:
    the scale is the group's mean |w|, a weight rounds to the nearest of -s, 0, +s)."""

    kind = "ternary"
    group: int = 64

    @property
    def name(self) -> str:
        return f"tern{self.group}"

    @classmethod
    def parse(cls, text: str) -> Ternary | None:
        match = re.fullmatch(r"tern(\d+)", text)
        return cls(int(match[1])) if match else None

    value_bits = 2

    def overhead_bits(self, rows: int, cols: int) -> int:
        return rows * -(-cols // self.group) * 16

    def code_group(self, cols: int) -> int:
        return self.group

    @classmethod
    def quantizer(cls, stack: Sequence[Ternary], rows: int, device: torch.device):
        return _TernaryQuantizer(stack[0].group)


class _TernaryQuantizer:
    def __init__(self, group: int) -> None:
        self.group = group

    def prepare(self, W: torch.Tensor, peers: torch.Tensor | None = None) -> None:
        return None

    def params(self, block: torch.Tensor) -> tuple[torch.Tensor]:
        return (block.abs().mean(dim=1, keepdim=True).clamp(min=1e-12),)  # [R, 1]

    def round(self, x: torch.Tensor, params: tuple[torch.Tensor]) -> torch.Tensor:
        (scale,) = params
        return scale * torch.clamp(torch.round(x / scale), -1, 1)


@pytest.fixture
def ternary(monkeypatch):
    monkeypatch.setitem(KINDS, "ternary", Ternary)


def test_names_parse_and_compose(ternary):
    assert parse_level("tern64").weights == Ternary(64)
    assert parse_level("tern32+s0.5").name == "s0.5+tern32"
    assert [lv.name for lv in parse_grid("dense,tern64,s0.5+tern64")] == ["dense", "tern64", "s0.5+tern64"]
    with pytest.raises(AllocatorError, match="two weights"):
        parse_level("tern64+w4")


def test_priced_exactly_everywhere(ternary):
    rows, cols = 8, 160  # a shorter last group
    by_hand = rows * cols * 2 + rows * 3 * 16
    assert storage_bits(parse_level("tern64"), rows, cols) == by_hand
    sparse = parse_level("s0.5+tern64")
    assert storage_bits(sparse, rows, cols) == rows * 80 * 2 + rows * cols + rows * 3 * 16  # values, mask, scales
    inv = Inventory.from_model(tiny_model("llama"))
    problem = build_problem(inv, parse_grid("dense,tern64"), Budget.parse("bits=8"))
    assert problem.cost[0, 1] == storage_bits(parse_level("tern64"), inv.layers[0].rows, inv.layers[0].cols)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_backend_applies_it_and_the_database_stores_it_exactly(ternary, backend):
    gen = torch.Generator().manual_seed(0)
    W, X = torch.randn(12, 128, generator=gen), torch.randn(256, 128, generator=gen)
    stats = LayerStats(128)
    stats.add_batch(X)
    level = parse_level("tern64")
    Q = compress_weight(W, level, BACKENDS[backend], stats)
    for r in range(12):
        for c in (0, 64):
            assert Q[r, c : c + 64].abs().unique().numel() <= 2  # 0 and the group's scale: -s, 0, +s
    parts, entries = encode_layer(W, {level: Q})
    assert torch.equal(decode(entries["tern64"], level, parts, tuple(W.shape)), Q)


def test_it_costs_dense_on_a_latency_table(ternary):
    assert kernel_for(parse_level("tern64")) == "dense"


def test_runs_exports_as_json_and_csv_and_every_other_exporter_refuses_naming_every_layer(
    ternary, tiny_model_dir, text_files, tmp_path
):  # fmt: skip
    out = tmp_path / "run"
    argv = _args(tiny_model_dir, text_files, out, "--method", "knapsack", "--sensitivity", "fisher", "--backend",
                 "gptq", "--levels", "dense,tern64,w4g64", "--target", "bits=6",
                 "--cache-dir", str(tmp_path / "c"))  # fmt: skip
    assert main(argv) == 0
    plan = Plan.load(out / "plan.json")
    assert plan.achieved["bits"] <= 6 and any(lv.name == "tern64" for lv in plan.assignment.values())
    json_plan = EXPORTERS["json"](plan)["plan.json"]
    assert Plan.from_dict(json.loads(json_plan)).assignment == plan.assignment
    table = pd.read_csv(pd.io.common.StringIO(EXPORTERS["csv"](plan)["plan.csv"]))
    assert set(table.weights.dropna()) <= {"tern64", "w4g64"} and (table.weights == "tern64").any()
    ternary_layers = [f"{n}={lv.name}" for n, lv in plan.assignment.items() if lv.name == "tern64"]
    for name in ("llmcompressor", "gptqmodel", "autoround", "llamacpp"):
        with pytest.raises(AllocatorError, match="cannot express levels") as refused:
            EXPORTERS[name](plan)
        message = str(refused.value)
        assert "\n" not in message and all(layer in message for layer in ternary_layers)
