"""Bit packing as compressed-tensors writes it (``pack_to_int32``, ``pack_fp4_to_uint8``), written here.

Integers: each row is one little-end-first bit stream of unsigned codes (offset binary: a signed code plus
2^(b-1), which is allocator's own unsigned code), element i at bits [i·b, i·b + b), cut into int32 words (two's
complement: bit 31 may be set); the tail of a row is padded with zeros. 3/5/6/7-bit codes straddle words.
"""

from __future__ import annotations

import torch


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit codes [rows, cols] -> int32 words [rows, ceil(cols * bits / 32)]."""
    rows, cols = codes.shape
    words = -(-cols * bits // 32)
    start = torch.arange(cols, dtype=torch.int64) * bits  # [cols] first bit of each element
    word, shift = start // 32, start % 32
    value = codes.to(torch.int64).cpu()  # [rows, cols]
    packed = torch.zeros(rows, words + 1, dtype=torch.int64)
    low = (value << shift) & 0xFFFFFFFF  # the part in its own word
    high = value >> (32 - shift)  # what straddles into the next word (0 where nothing does)
    packed.scatter_add_(1, word.expand(rows, cols), low)
    packed.scatter_add_(1, (word + 1).expand(rows, cols), torch.where(shift + bits > 32, high, 0))
    packed = packed[:, :words]
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)
