"""Unpad once, repad once: the padding-free path of the encoder.

A padded batch ``(batch, seq)`` with an ``attention_mask`` becomes ``total_tokens`` packed
rows; every layer then runs on ``(total_tokens, hidden)`` and the packed attention kernel
reads ``cu_seqlens``. Any 0/1 mask works (left padding, gaps): rows are gathered by their
flat index, and each sequence's tokens stay in order.
"""

from __future__ import annotations

from dataclasses import dataclass

from typing import Optional

import torch

__all__ = ["Unpadded", "unpad", "pad_rows", "positions_of"]


@dataclass
class Unpadded:
    """Where the real tokens of a padded batch live.

    ``indices``: ``(total_tokens,)`` int64 flat positions ``b * seq + s`` of the real tokens,
    in row-major order. ``cu_seqlens``: ``(batch + 1,)`` int32 cumulative token counts.
    ``max_seqlen``: the longest row's length when the caller knew it, else an upper bound
    (the padded width ``seq``; a bound is enough for the kernel's grid).
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    seq: int


def positions_of(flags: torch.Tensor, count: Optional[int] = None) -> torch.Tensor:
    """(count,) int64 positions of the True entries of 1-D bool ``flags``, in order. With
    ``count`` known (the models read it in their batched value check) no host sync: a
    stable sort puts the True entries first; without it, ``nonzero`` (which syncs to learn
    its output size)."""
    if count is None:
        return flags.nonzero().squeeze(1)
    return torch.argsort((~flags).to(torch.uint8), stable=True)[:count]


def unpad(attention_mask: torch.Tensor, total_tokens: Optional[int] = None,
          longest: Optional[int] = None) -> Unpadded:
    """``attention_mask`` ``(batch, seq)`` (bool or 0/1 ints) -> :class:`Unpadded`.

    ``total_tokens`` (the number of real positions) and ``longest`` (the longest row's),
    when the caller has read them already (the models' batched value check), make this
    free of host synchronisation: the real positions come from a stable sort instead of
    ``nonzero`` (whose output size the host must wait for), and ``max_seqlen`` is exact
    instead of the padded width."""
    batch, seq = attention_mask.shape
    valid = attention_mask.reshape(-1) != 0
    indices = positions_of(valid, total_tokens)
    lengths = (attention_mask != 0).sum(dim=1, dtype=torch.int32)
    cu_seqlens = torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    return Unpadded(indices=indices, cu_seqlens=cu_seqlens,
                    max_seqlen=seq if longest is None else longest, batch=batch, seq=seq)


def pad_rows(rows: torch.Tensor, where: Unpadded) -> torch.Tensor:
    """Packed ``(total_tokens, ...)`` -> padded ``(batch, seq, ...)`` with zeros at padding.
    Differentiable (the gradient gathers the real rows back)."""
    out = rows.new_zeros((where.batch * where.seq,) + tuple(rows.shape[1:]))
    out = out.index_copy(0, where.indices, rows)
    return out.view((where.batch, where.seq) + tuple(rows.shape[1:]))
