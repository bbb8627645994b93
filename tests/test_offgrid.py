"""scripts/offgrid_model.py: the channel rescaling keeps the model's function, moves every linear, and its GGUF
writer lays q/k rows out as transformers' GGUF reader expects to undo (results/llamacpp_offgrid rests on both)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import torch
import transformers.modeling_gguf_pytorch_utils as gguf_utils

from tests.conftest import tiny_model

SCRIPT = Path(__file__).parents[1] / "scripts" / "offgrid_model.py"
sys.path.insert(0, str(SCRIPT.parent))  # it imports its neighbour gguf_to_f16 as a script would
_SPEC = importlib.util.spec_from_file_location("offgrid_model", SCRIPT)
offgrid = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(offgrid)


def test_rescaling_keeps_the_function_and_moves_every_linear_weight():
    model = tiny_model("llama").double()  # GQA: 4 query heads share 2 KV heads
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(ids).logits
        offgrid.rescale(model, 0.4, np.random.default_rng(0))
        got = model(ids).logits
    eps = torch.finfo(torch.float64).eps
    assert torch.allclose(got, reference, rtol=0, atol=1e4 * eps * reference.abs().max())
    moved = [k for k, v in model.state_dict().items() if k.endswith("proj.weight") and not torch.equal(v, before[k])]
    assert len(moved) == 7 * model.config.num_hidden_layers
    # input columns of q (and of down) are rescaled unevenly: no block of a row keeps its values' ratios
    q = "model.layers.0.self_attn.q_proj.weight"
    ratio = model.state_dict()[q][0, :8] / before[q][0, :8]
    assert ratio.std() > 0.1


def test_rotary_rows_are_undone_by_transformers_gguf_reader():
    undo = gguf_utils.LlamaTensorProcessor._reverse_permute_weights  # what loads a llama GGUF into transformers
    rng = np.random.default_rng(0)
    for heads, kv in ((9, 9), (9, 3)):
        w = rng.standard_normal((kv * 64, 576)).astype(np.float32)
        np.testing.assert_array_equal(undo(None, offgrid.rotary_rows(w, kv), heads, kv), w)
