"""Packing integer codes into int32 words, as the GPTQ v1 format stores them.

Codes of ``bits`` bits are laid out as one little-endian bit stream along the packed dimension: code
k occupies bits [k·bits, (k+1)·bits) of the stream, and word j holds stream bits [32j, 32j + 32).
For 2, 4 and 8 bits this is the usual "32/bits codes per word, code j at shift bits·j"; for 3 bits it
is AutoGPTQ's layout of 32 codes in 3 words, where codes 10 and 21 straddle word boundaries.
"""

from __future__ import annotations

import torch

from compress.errors import CompressError


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 0) -> torch.Tensor:
    """Pack unsigned ``codes`` (2-D, values < 2^bits) along ``dim`` into int32 words."""
    values = codes.to(torch.int64)
    if dim == 1:
        values = values.t()
    n, cols = values.shape
    if (n * bits) % 32:
        raise CompressError(f"cannot pack {n} codes of {bits} bits into whole 32-bit words")
    words = torch.zeros(n * bits // 32, cols, dtype=torch.int64)
    for k in range(n):  # a loop over rows, each a vector op over all columns
        start = k * bits
        word, shift = divmod(start, 32)
        words[word] |= (values[k] << shift) & 0xFFFFFFFF
        if shift + bits > 32:  # the code straddles into the next word
            words[word + 1] |= values[k] >> (32 - shift)
    packed = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)  # two's complement
    return packed.t().contiguous() if dim == 1 else packed


def unpack_int32(packed: torch.Tensor, bits: int, n: int, dim: int = 0) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``n`` codes along ``dim`` (int64)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    if dim == 1:
        words = words.t()
    mask = (1 << bits) - 1
    out = torch.zeros(n, words.shape[1], dtype=torch.int64)
    for k in range(n):
        word, shift = divmod(k * bits, 32)
        value = words[word] >> shift
        if shift + bits > 32:
            value = value | (words[word + 1] << (32 - shift))
        out[k] = value & mask
    return out.t().contiguous() if dim == 1 else out
