"""Compact, exact encodings of one layer's compressed weights at every level of a grid.

Storing every level as a full copy (EvoPress's database) costs levels × model bytes. Most of that is
redundant, and each redundancy has an exact encoding whose decode is a few element-wise GPU ops:

- ``order``: nested pruning (magnitude, Wanda: a sparser level removes a superset and keeps dense
  values). One ``uint8`` per weight, the first level of the chain that removes it; a level is a
  threshold on it. No per-level copy.
- ``grid``: quantized levels as a checkpoint stores them: each weight's integer code (packed to 1/2/4/8 bits)
  and the weight format's grid parameters per (row, group) (scale, zero point), decoded by the format's own
  dequantization. The codes and scales a checkpoint writer needs come from here.
- ``codebook``: other quantized levels (GGUF types, a format without codes). Each (row, group) holds at most
  2^bits distinct values, so a code of ``bits`` bits indexes a per-group table of those values.
- ``masked``: any other sparse level: a packed keep-mask, and the kept values where they moved
  (SparseGPT) rather than being the dense ones (magnitude's N:M). Exact for any tensor: the fallback.
  In 16-bit floats a moved value is stored as its step in ulps from the dense value (4 or 8 bits).

Every decode returns exactly the tensor that was encoded (tested per level type); the encoder checks
the condition each encoding relies on and falls back to the next one otherwise.
"""

from __future__ import annotations

import torch

from allocator.levels import Level
from allocator.levels.quantizer import Params

Parts = dict[str, torch.Tensor]  # the tensors of one (layer, level): part name -> tensor
Entry = dict  # the manifest entry of one (layer, level): {"enc": ..., params}


# ---- bit packing -----------------------------------------------------------------------------------
def pack(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Integers in [0, 2^width) (any shape) packed ``8 // width`` per byte, row-major."""
    per = 8 // width
    flat = codes.flatten().to(torch.uint8)
    flat = torch.cat([flat, flat.new_zeros(-len(flat) % per)]).view(-1, per)
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=codes.device)
    return (flat << shifts).sum(dim=1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """The first ``count`` integers packed by :func:`pack` (uint8, flat)."""
    shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & (2**width - 1)).flatten()[:count]


def _width(bits: int) -> int:
    return next(w for w in (1, 2, 4, 8) if w >= bits)


# ---- encoders --------------------------------------------------------------------------------------
def encode_layer(dense: torch.Tensor, compressed: dict[Level, torch.Tensor],
                 params: dict[Level, Params] | None = None) -> tuple[Parts, dict[str, Entry]]:  # fmt: skip
    """Encode a layer's levels: its tensors (``"dense"`` once, then ``"<level>|<part>"``) and manifest entries.

    ``dense`` and every compressed weight are ``[rows, cols]`` in the stored dtype; ``params`` holds the grid
    parameters the backend used for a quantized level (then stored as codes and parameters where exact).
    """
    parts: Parts = {"dense": dense.contiguous()}
    entries: dict[str, Entry] = {}
    chain = _nested_chain(dense, compressed)
    if chain:
        parts["order"] = _order(chain, compressed, dense.shape)
        entries.update({lv.name: {"enc": "order", "index": i} for i, lv in enumerate(chain)})
    for level, Q in compressed.items():
        if level.name in entries:
            continue
        if level.is_dense and torch.equal(Q, dense):
            entries[level.name] = {"enc": "dense"}
            continue
        if level.drop and not Q.any():
            entries[level.name] = {"enc": "zeros"}
            continue
        grid = _grid(Q, level, (params or {}).get(level, ())) if level.quantized else None
        level_parts, entry = grid or (_codebook(Q, level) if level.quantized else _masked(Q, dense))
        parts.update({f"{level.name}|{k}": v for k, v in level_parts.items()})
        entries[level.name] = entry
    return parts, entries


def _nested_chain(dense: torch.Tensor, compressed: dict[Level, torch.Tensor]) -> list[Level]:
    """The longest run of pruning-only levels, in increasing sparsity, whose removed sets are nested and
    whose kept weights equal the dense ones (at most 254, the ``uint8`` order's range)."""
    pruning_only = [lv for lv in compressed if lv.prune is not None and lv.prune.nm is None and lv.weights is None]
    candidates = sorted(pruning_only, key=lambda lv: -lv.sparsity)
    chain: list[Level] = []
    previous = None
    for level in reversed(candidates):  # density decreasing: sparsity increasing
        Q = compressed[level]
        removed = Q == 0
        if not torch.equal(torch.where(removed, 0, dense), Q):
            continue  # kept values moved (SparseGPT): not a threshold of the dense weight
        if previous is not None and (previous & ~removed).any():
            continue  # not a superset of the sparser-so-far chain
        chain.append(level)
        previous = removed
        if len(chain) == 254:
            break
    return chain


def _order(chain: list[Level], compressed: dict[Level, torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Per weight, the index in ``chain`` of the first level that removes it (``len(chain)``: none)."""
    order = torch.full(shape, len(chain), dtype=torch.uint8, device=compressed[chain[0]].device)
    for i in reversed(range(len(chain))):
        order[compressed[chain[i]] == 0] = i
    return order


def _masked(Q: torch.Tensor, dense: torch.Tensor | None = None) -> tuple[Parts, Entry]:
    """A packed keep-mask and the kept values: none where they are the dense ones (magnitude's N:M), as
    small steps from the dense values where that is smaller (16-bit floats), else as they are."""
    keep = Q != 0
    mask = pack(keep, 1)
    if dense is not None and torch.equal(torch.where(keep, dense, 0), Q):
        return {"mask": mask}, {"enc": "masked", "values": "dense"}
    plain = ({"mask": mask, "values": Q[keep]}, {"enc": "masked"})
    if dense is None or Q.element_size() != 2:
        return plain
    return min([plain, *(_steps(Q[keep], dense[keep], mask, w) for w in (4, 8))], key=lambda pe: _bytes(pe[0]))


def _ordered(x: torch.Tensor) -> torch.Tensor:
    """16-bit floats as int32 in the floats' order (adjacent floats differ by 1); its own inverse on int16."""
    b = x.view(torch.int16)
    return (b ^ ((b >> 15) & 0x7FFF)).int()


def _steps(kept: torch.Tensor, dense: torch.Tensor, mask: torch.Tensor, width: int) -> tuple[Parts, Entry]:
    """Kept values as ``width``-bit steps (in units in the last place) from the dense values.

    OBS moves a kept bf16 weight by a few ulps, so most steps fit in 4 or 8 bits; code 0 marks a value
    whose step does not fit, stored as is in ``exceptions`` (in order).
    """
    half = 2 ** (width - 1)
    step = _ordered(kept) - _ordered(dense)
    fits = step.abs() < half
    codes = torch.where(fits, step + half, 0)
    parts = {"mask": mask, "codes": pack(codes, width), "exceptions": kept[~fits]}
    return parts, {"enc": "masked", "values": "steps", "width": width, "kept": kept.numel()}


def _codebook(Q: torch.Tensor, level: Level) -> tuple[Parts, Entry]:
    """Codes into per-(row, group) tables of the group's distinct values (sized to the most any group has);
    ``masked`` where that is smaller (tiny groups) or a group has more than 256 values."""
    rows, cols = Q.shape
    group = level.weights.code_group(cols)
    n_groups = -(-cols // group)
    # a short last group is padded with its own last value: no new distinct value, sliced off on decode
    padded = torch.cat([Q, Q[:, -1:].expand(rows, n_groups * group - cols)], dim=1)
    values, where = padded.view(rows, n_groups, group).sort(dim=-1)
    rank = torch.cat([values.new_zeros(rows, n_groups, 1, dtype=torch.long),
                      (values[..., 1:] != values[..., :-1]).long().cumsum(-1)], dim=-1)  # fmt: skip
    entries = int(rank[..., -1].max()) + 1
    fallback = _masked(Q)
    if entries > 256:
        return fallback
    table = values.new_zeros(rows, n_groups, entries).scatter_(-1, rank, values)
    codes = torch.empty_like(rank).scatter_(-1, where, rank)
    width = _width(max(1, (entries - 1).bit_length()))
    parts = {"codes": pack(codes, width), "table": table}
    if _bytes(parts) >= _bytes(fallback[0]):
        return fallback
    return parts, {"enc": "codebook", "width": width, "group": group}


def _grid(Q: torch.Tensor, level: Level, params: Params) -> tuple[Parts, Entry] | None:
    """Codes and grid parameters, if the weight format has codes and they decode to ``Q`` exactly."""
    codes = level.weights.codes(Q, params) if params else None
    if codes is None or not torch.equal(level.weights.dequantize(codes, params, Q.dtype), Q):
        return None
    width = _width(max(1, int(codes.max()).bit_length()))
    parts = {"codes": pack(codes, width), **{f"p{i}": p.contiguous() for i, p in enumerate(params)}}
    return parts, {"enc": "grid", "width": width, "params": len(params)}


def _bytes(parts: Parts) -> int:
    return sum(t.numel() * t.element_size() for t in parts.values())


# ---- decoder ---------------------------------------------------------------------------------------
def grid_of(entry: Entry, level: Level, parts: Parts, shape: tuple[int, int]) -> tuple[torch.Tensor, Params]:
    """The codes ([rows, cols], uint8) and grid parameters of a ``grid`` entry."""
    codes = unpack(parts[f"{level}|codes"], entry["width"], shape[0] * shape[1]).view(shape)
    return codes, tuple(parts[f"{level}|p{i}"] for i in range(entry["params"]))


def decode(entry: Entry, level: Level, parts: Parts, shape: tuple[int, int]) -> torch.Tensor:
    """The ``[rows, cols]`` weight of ``level`` from its entry and the layer's parts (on their device)."""
    dense = parts["dense"]
    enc = entry["enc"]
    if enc == "dense":
        return dense
    if enc == "zeros":
        return torch.zeros_like(dense)
    if enc == "order":
        return torch.where(parts["order"] <= entry["index"], 0, dense)
    if enc == "masked":  # static shapes only (counts from the manifest): no host sync on a GPU
        keep = unpack(parts[f"{level}|mask"], 1, dense.numel()).bool()
        if entry.get("values") == "dense":
            return torch.where(keep.view(shape), dense, 0)
        flat = dense.flatten()
        values = parts.get(f"{level}|values")
        where = torch.nonzero_static(keep, size=entry["kept"] if values is None else values.numel()).squeeze(1)
        if values is None:  # steps from the dense values, code 0 marking an exception stored as is
            codes = unpack(parts[f"{level}|codes"], entry["width"], entry["kept"]).int()
            ordered = _ordered(flat[where]) + codes - 2 ** (entry["width"] - 1)
            values = _ordered(ordered.short()).short().view(dense.dtype)
            exceptions = parts[f"{level}|exceptions"]
            if exceptions.numel():
                values[torch.nonzero_static(codes == 0, size=exceptions.numel()).squeeze(1)] = exceptions
        return torch.zeros_like(flat).index_put_((where,), values).view(shape)
    if enc == "grid":
        return level.weights.dequantize(*grid_of(entry, level, parts, shape), dense.dtype)
    if enc == "codebook":
        table = parts[f"{level}|table"]
        rows, groups, _ = table.shape
        codes = unpack(parts[f"{level}|codes"], entry["width"], rows * groups * entry["group"])
        return table.gather(-1, codes.view(rows, groups, -1).long()).view(rows, -1)[:, : shape[1]]
    raise ValueError(f"unknown encoding {enc!r}")
