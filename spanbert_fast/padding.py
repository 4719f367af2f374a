"""Unpad once, repad once: the padding-free path of the encoder.

A padded batch ``(batch, seq)`` with an ``attention_mask`` becomes ``total_tokens`` packed
rows; every layer then runs on ``(total_tokens, hidden)`` and the packed attention kernel
reads ``cu_seqlens``. Any 0/1 mask works (left padding, gaps): rows are gathered by their
flat index, and each sequence's tokens stay in order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import torch

__all__ = ["Unpadded", "unpad", "unpad_lengths", "pad_rows", "positions_of"]


@dataclass
class Unpadded:
    """Where the real tokens of a padded batch live.

    ``indices``: ``(total_tokens,)`` int64 flat positions ``b * seq + s`` of the real tokens,
    in row-major order. ``cu_seqlens``: ``(batch + 1,)`` int32 cumulative token counts.
    ``max_seqlen``: the longest row's length when the caller knew it, else an upper bound
    (the padded width ``seq``; a bound is enough for the kernel's grid).

    Static shapes (``has_filler=True``, see :func:`unpad_lengths`): ``total_tokens`` is
    rounded up to a bucket by *filler* tokens, which come after the real ones with index
    ``batch * seq`` (one past the padded batch) and form extra sequences of their own at
    the end of ``cu_seqlens`` (so ``(batch + fillers + 1,)``): attention never mixes them
    with real tokens, and the repad drops them.

    Everything here is known on the host, so a model given it reads nothing from the
    device to unpad; ``SpanMaskingCollator(packed=True)`` builds it on the CPU.
    """

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch: int
    seq: int
    has_filler: bool = False

    @property
    def total_tokens(self) -> int:
        """Packed rows (real tokens, plus filler tokens with ``has_filler``): a static size."""
        return self.indices.shape[0]

    def to(self, device, non_blocking: bool = False) -> "Unpadded":
        """The same layout with its tensors on ``device`` (their dtypes never change), so
        that a collated batch moves with ``{k: v.to(device) for k, v in batch.items()}``."""
        if isinstance(device, torch.dtype):
            raise TypeError("Unpadded.to takes a device: its indices stay int64 and its "
                            "cu_seqlens int32")
        return replace(self, indices=self.indices.to(device, non_blocking=non_blocking),
                       cu_seqlens=self.cu_seqlens.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Unpadded":
        """For ``DataLoader(pin_memory=True)``."""
        return replace(self, indices=self.indices.pin_memory(),
                       cu_seqlens=self.cu_seqlens.pin_memory())


def unpad_lengths(lengths: Sequence[int], seq: int, *, total_tokens: Optional[int] = None,
                  filler_sequences: int = 0, max_seqlen: Optional[int] = None,
                  device=None) -> Unpadded:
    """:class:`Unpadded` of a right-padded ``(len(lengths), seq)`` batch from its row
    lengths, computed on the host (no device read, ever).

    ``total_tokens`` (static shapes) rounds the packed rows up with filler tokens (index
    ``batch * seq``), split into exactly ``filler_sequences`` sequences of at most
    ``max_seqlen`` tokens (empty ones are fine), so that ``cu_seqlens`` has the same
    length for every batch. ``max_seqlen`` defaults to the longest row.
    """
    lengths = [int(n) for n in lengths]
    batch = len(lengths)
    if any(n < 0 or n > seq for n in lengths):
        raise ValueError(f"lengths must lie in [0, seq={seq}], got {lengths}")
    real = sum(lengths)
    longest = max(lengths, default=0)
    max_seqlen = longest if max_seqlen is None else int(max_seqlen)
    if max_seqlen < longest:
        raise ValueError(f"max_seqlen={max_seqlen} is shorter than the longest row ({longest})")
    total = real if total_tokens is None else int(total_tokens)
    filler = total - real
    if filler < 0:
        raise ValueError(f"total_tokens={total} is less than the real tokens ({real})")
    if filler and (max_seqlen <= 0 or math.ceil(filler / max_seqlen) > filler_sequences):
        raise ValueError(f"{filler} filler tokens do not fit in filler_sequences="
                         f"{filler_sequences} of at most max_seqlen={max_seqlen} tokens")
    chunks = []
    for _ in range(filler_sequences):
        chunks.append(min(filler, max_seqlen))
        filler -= chunks[-1]
    counts = torch.tensor(lengths + chunks, dtype=torch.int64)
    cu_seqlens = torch.nn.functional.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
    row_lengths = counts[:batch]
    starts = torch.arange(batch, dtype=torch.int64) * seq
    offsets = torch.arange(real, dtype=torch.int64) - torch.repeat_interleave(
        cu_seqlens[:batch].to(torch.int64), row_lengths, output_size=real)
    indices = torch.repeat_interleave(starts, row_lengths, output_size=real) + offsets
    if total > real:
        indices = torch.cat([indices, torch.full((total - real,), batch * seq,
                                                 dtype=torch.int64)])
    return Unpadded(indices=indices.to(device), cu_seqlens=cu_seqlens.to(device),
                    max_seqlen=max_seqlen, batch=batch, seq=seq,
                    has_filler=filler_sequences > 0)


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


def gather_rows(t: torch.Tensor, where: Unpadded) -> torch.Tensor:
    """Padded ``(batch, seq, ...)`` -> packed ``(total_tokens, ...)``; filler tokens read
    the batch's last position (any valid row: their results are dropped)."""
    indices = where.indices
    if where.has_filler:
        indices = indices.clamp(max=where.batch * where.seq - 1)
    return t.reshape((-1,) + tuple(t.shape[2:])).index_select(0, indices)


def pad_rows(rows: torch.Tensor, where: Unpadded) -> torch.Tensor:
    """Packed ``(total_tokens, ...)`` -> padded ``(batch, seq, ...)`` with zeros at padding.
    Differentiable (the gradient gathers the real rows back). Filler tokens land in one
    extra row past the end, which is dropped."""
    slots = where.batch * where.seq
    out = rows.new_zeros((slots + int(where.has_filler),) + tuple(rows.shape[1:]))
    out = out.index_copy(0, where.indices, rows)
    if where.has_filler:
        out = out[:slots]
    return out.view((where.batch, where.seq) + tuple(rows.shape[1:]))
