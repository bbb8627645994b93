"""The dense reference of a run (perplexity and the KL teacher), cached per model, data and settings.

Every run starts by evaluating the dense model; a second run on the same model and text would repeat
that work. The cache is keyed by a fingerprint of the weights (not only the shapes: a fine-tune has the
same shapes), of the exact token windows, and of dtype and device type, so another model or other data
is a miss, never a stale hit; the entry also records its key and is refused if that does not match.

The teacher's log-probs are ``[n, T, V]`` (800 MB for SmolLM2's 8 windows of 512 tokens), so the cache
keeps the LM head's input instead (``[n, T, d]``, 9 MB) and re-applies the dense head when loaded: one
matmul instead of a forward pass. When an architecture does more after its head than a linear map (e.g.
logit soft-capping), the recomputed log-probs would differ; that is checked when the entry is written,
and then only the perplexity is cached and the teacher is recomputed by a forward pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import nn

from allocator.errors import first_line
from allocator.evaluate import log_probs, window_nll
from allocator.io import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

_SAMPLES_PER_TENSOR = 4096  # weights hashed per parameter: any fine-tune changes almost all of them


def weights_fingerprint(model: nn.Module) -> str:
    """A hash of every parameter's name, shape, dtype and an evenly strided sample of its values."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLES_PER_TENSOR)].float().cpu()
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:24]


def _tokens_hash(seqs: torch.Tensor) -> str:
    return hashlib.sha256(seqs.to(torch.int64).cpu().numpy().tobytes()).hexdigest()[:16]


def reference_key(model: nn.Module, eval_seqs: torch.Tensor, kl_seqs: torch.Tensor) -> dict:
    """What the dense reference depends on."""
    p = next(model.parameters())
    return {"weights": weights_fingerprint(model), "eval": _tokens_hash(eval_seqs), "eval_shape": list(eval_seqs.shape),
            "kl": _tokens_hash(kl_seqs), "kl_shape": list(kl_seqs.shape), "dtype": str(p.dtype),
            "device": p.device.type}  # fmt: skip


def _head_inputs(model: nn.Module, seqs: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense log-probs of ``seqs`` and, captured on the way, the LM head's inputs ([n, T, d], on the CPU)."""
    captured: list[torch.Tensor] = []
    head = model.get_output_embeddings()
    handle = head.register_forward_hook(lambda _m, inp, _out: captured.append(inp[0].detach().cpu()))
    try:
        teacher = log_probs(model, seqs, batch_size)
    finally:
        handle.remove()
    return teacher, torch.cat(captured)


@torch.no_grad()
def _from_head_inputs(model: nn.Module, hidden: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Log-probs ``[n, T, V]`` (float32, CPU) from cached head inputs, through the model's dense head."""
    head = model.get_output_embeddings()
    device = next(head.parameters()).device
    out = [F.log_softmax(head(hidden[i : i + batch_size].to(device)).float(), dim=-1).cpu()
           for i in range(0, len(hidden), batch_size)]  # fmt: skip
    return torch.cat(out)


class DenseReference(NamedTuple):
    """The dense model's perplexity on the evaluation windows, its per-window NLLs (None from an entry written
    before they were kept), the KL teacher's log-probs, and whether the cache served them."""

    perplexity: float
    teacher: torch.Tensor
    cached: bool
    window_nll: np.ndarray | None


def dense_reference(
    model: nn.Module,
    eval_seqs: torch.Tensor,
    kl_seqs: torch.Tensor,
    batch_size: int,
    folder: Path | None,
) -> DenseReference:
    """Dense perplexity (and per-window NLLs) on ``eval_seqs``, the teacher log-probs on ``kl_seqs``, and whether
    the cache served them.

    ``model`` must hold its dense weights. ``folder``: where entries live (None: no cache). A damaged entry
    (truncated, not JSON, fields missing, head inputs of the wrong size or hash) is deleted and recomputed.
    """
    key = reference_key(model, eval_seqs, kl_seqs) if folder is not None else {}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    entry = folder / f"{name}.json" if folder is not None else None
    if entry is not None and entry.is_file():
        try:
            width = model.get_output_embeddings().weight.shape[-1]
            ppl, hidden, nll = _read_entry(entry, key, (*kl_seqs.shape, width), len(eval_seqs))
        except ValueError as exc:
            log.warning("dense reference cache %s is damaged (%s): deleted, recomputing", entry, exc)
            entry.unlink(missing_ok=True)
            entry.with_suffix(".safetensors").unlink(missing_ok=True)
        else:
            fresh = hidden is None  # only the perplexity was cached: the teacher takes a forward pass
            teacher = log_probs(model, kl_seqs, batch_size) if fresh else _from_head_inputs(model, hidden, batch_size)
            return DenseReference(ppl, teacher, True, nll)
    nll = window_nll(model, eval_seqs, batch_size, desc="dense perplexity")
    ppl = math.exp(float(nll.mean()))
    teacher, hidden = _head_inputs(model, kl_seqs, batch_size)
    if entry is None:
        return DenseReference(ppl, teacher, False, nll)
    again = _from_head_inputs(model, hidden[:batch_size], batch_size)  # one batch tells whether the head is linear
    first = teacher[:batch_size]
    tol = 16 * torch.finfo(next(model.parameters()).dtype).eps * max(1.0, float(first.abs().max()))
    reusable = again.shape == first.shape and bool(torch.allclose(again, first, rtol=0, atol=tol))
    meta = {"key": key, "perplexity": ppl, "window_nll": nll.tolist(), "head_inputs": reusable}
    if reusable:
        raw = save({"hidden": hidden.contiguous()})
        with atomic_path(folder / f"{name}.safetensors") as tmp:
            tmp.write_bytes(raw)
        meta.update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest())
    write_json_atomic(entry, meta)
    return DenseReference(ppl, teacher, False, nll)


def _read_entry(entry: Path, key: dict, shape: tuple[int, ...],
                windows: int) -> tuple[float, torch.Tensor | None, np.ndarray | None]:  # fmt: skip
    """The cached perplexity, head inputs (None where only the perplexity is cached) and per-window NLLs (None in
    an older entry); ValueError saying what is wrong with a damaged entry or one written for another key."""
    try:
        meta = json.loads(entry.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    if meta.get("key") != key:
        raise ValueError(f"written for {str(meta.get('key'))[:200]}, not this model and data")
    ppl, reusable = meta.get("perplexity"), meta.get("head_inputs")
    if isinstance(ppl, bool) or not isinstance(ppl, int | float) or not math.isfinite(ppl) or ppl <= 0:
        raise ValueError(f"perplexity {ppl!r} is not a positive number")
    if not isinstance(reusable, bool):
        raise ValueError(f"head_inputs {reusable!r} is not true or false")
    nll = _window_nll(meta.get("window_nll"), windows, float(ppl))
    if not reusable:
        return float(ppl), None, nll
    tensors = entry.with_suffix(".safetensors")
    raw = tensors.read_bytes() if tensors.is_file() else b""
    if "bytes" in meta and (len(raw) != meta["bytes"] or hashlib.sha256(raw).hexdigest() != meta.get("sha256")):
        raise ValueError(f"{tensors.name} has {len(raw)} bytes, not the {meta['bytes']} written, or another hash")
    try:
        hidden = load(raw)["hidden"]
    except (SafetensorError, KeyError) as exc:
        raise ValueError(f"{tensors.name} does not load: {first_line(exc, None)}") from None
    if tuple(hidden.shape) != shape or not hidden.is_floating_point():
        raise ValueError(f"{tensors.name} holds {hidden.dtype} {list(hidden.shape)}, not floats of shape {list(shape)}")
    return float(ppl), hidden, nll


def _window_nll(value, windows: int, ppl: float) -> np.ndarray | None:
    """An entry's per-window NLLs, checked: one finite non-negative number per window whose mean is the perplexity's
    logarithm (None: an entry written before they were kept)."""
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != windows
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)):  # fmt: skip
        raise ValueError(f"window_nll is not a list of {windows} numbers")
    nll = np.asarray(value, dtype=np.float64)
    if not np.isfinite(nll).all() or (nll < 0).any() or not math.isclose(nll.mean(), math.log(ppl), rel_tol=1e-9):
        raise ValueError("window_nll holds negative or non-finite values, or disagrees with the perplexity")
    return nll
