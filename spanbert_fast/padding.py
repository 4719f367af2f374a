"""Unpad once, repad once: the padding-free path of the encoder.

A padded batch ``(batch, seq)`` with an ``attention_mask`` becomes ``total_tokens`` packed
rows; every layer then runs on ``(total_tokens, hidden)`` and the packed attention kernel
reads ``cu_seqlens``. Any 0/1 mask works (left padding, gaps): rows are gathered by their
flat index, and each sequence's tokens stay in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Unpadded", "unpad", "pad_rows"]


@dataclass
class Unpadded:
    """Where the real tokens of a padded batch live.

    ``indices``: ``(total_tokens,)`` int64 flat positions ``b * seq + s`` of the real tokens,
    in row-major order. ``cu_seqlens``: ``(batch + 1,)`` int32 cumulative token counts.
    ``max_seqlen``: an upper bound on the per-row lengths (the padded width ``seq``; a bound
    is enough for the kernel's grid and needs no device-to-host sync).
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    seq: int


def unpad(attention_mask: torch.Tensor) -> Unpadded:
    """``attention_mask`` ``(batch, seq)`` (bool or 0/1 ints) -> :class:`Unpadded`."""
    batch, seq = attention_mask.shape
    valid = attention_mask.reshape(-1) != 0
    indices = valid.nonzero().squeeze(1)
    lengths = (attention_mask != 0).sum(dim=1, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return Unpadded(indices=indices, cu_seqlens=cu_seqlens, max_seqlen=seq, batch=batch, seq=seq)


def pad_rows(rows: torch.Tensor, where: Unpadded) -> torch.Tensor:
    """Packed ``(total_tokens, ...)`` -> padded ``(batch, seq, ...)`` with zeros at padding.
    Differentiable (the gradient gathers the real rows back)."""
    out = rows.new_zeros((where.batch * where.seq,) + tuple(rows.shape[1:]))
    out = out.index_copy(0, where.indices, rows)
    return out.view((where.batch, where.seq) + tuple(rows.shape[1:]))
