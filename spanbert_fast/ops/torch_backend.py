"""The fast plain-PyTorch backend, for every device: what ``backend="torch"`` runs.

:mod:`spanbert_fast.ops.reference` is the oracle: simple, obviously right, upcast to fp32, and
what every test compares against. This module is the backend a user runs on a CPU (or a
GPU without Triton), so it is written for speed with the same results within rounding:

* attention goes through ``torch.nn.functional.scaled_dot_product_attention`` (the fused
  flash/memory-efficient kernels of torch, on CPU too) instead of the oracle's explicit
  ``softmax(q k^T) v``; in the input dtype, as transformers' "sdpa" BERT runs it;
* the packed (padding-free) layout repads only for attention: the dense layers of the
  encoder run on ``(total_tokens, hidden)`` and only ``q``, ``k``, ``v`` are scattered into
  a ``(batch, longest, heads, head_dim)`` block for one SDPA call, then gathered back.
  Attention is a few percent of a BERT layer's FLOPs at SpanBERT's lengths, so grouping
  the sequences into length buckets (more, smaller SDPA calls) is not worth its launches.

The other ops (LayerNorm, bias+GELU, the SBO head, the linear cross-entropy) are already
single fused torch calls in the reference and are used from there.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["attention"]


def _sdpa_padded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 key_padding_mask: Optional[torch.Tensor], scale: float,
                 dropout_p: float) -> torch.Tensor:
    """``(batch, heads, seq, head_dim)`` attention; ``key_padding_mask`` ``(batch, seq)``
    bool (True = attend) or None. Rows whose keys are all masked give zeros."""
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    # A row with no valid key would softmax over nothing (NaN, and NaN gradients that
    # reach dk/dv through 0 * NaN). Let such a row attend to everything, then zero its
    # output: its gradient is then exactly zero. Branch-free, so compile traces it.
    empty = ~key_padding_mask.any(dim=-1)
    attend = key_padding_mask | empty.unsqueeze(-1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attend[:, None, None, :],
                                         dropout_p=dropout_p, scale=scale)
    return out.masked_fill(empty[:, None, None, None], 0.0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              key_padding_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
              max_seqlen: int, softmax_scale: float, dropout_p: float) -> torch.Tensor:
    """Bidirectional attention, arguments as :func:`spanbert_fast.ops.reference.attention`
    (already validated by :func:`spanbert_fast.ops.attention`).

    Padded: ``q, k, v`` ``(batch, heads, seq, head_dim)`` with ``key_padding_mask``
    ``(batch, seq)`` bool or None. Packed: ``(total_tokens, heads, head_dim)`` with
    ``cu_seqlens`` ``(batch + 1,)`` and ``max_seqlen`` >= every length. Dropout on the
    attention probabilities draws from torch's global RNG (plain autograd replays it).
    Returns the context in the layout and dtype of ``q``.
    """
    if cu_seqlens is None:
        return _sdpa_padded(q, k, v, key_padding_mask, softmax_scale, dropout_p)
    total, heads, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    starts = cu_seqlens[:-1].to(torch.long)
    lengths = cu_seqlens[1:].to(torch.long) - starts
    # The block is as wide as max_seqlen: the models pass the exact longest row (read in
    # their one batched check), so no padding beyond it is attended over.
    width = int(max_seqlen)
    # Token t of sequence b goes to row b * width + (t - start_b) of the padded block.
    sequence = torch.repeat_interleave(torch.arange(batch, device=q.device), lengths,
                                       output_size=total)
    slot = sequence * width + torch.arange(total, device=q.device) - starts[sequence]

    def to_padded(x: torch.Tensor) -> torch.Tensor:
        padded = x.new_zeros((batch * width, heads, head_dim)).index_copy(0, slot, x)
        return padded.view(batch, width, heads, head_dim).transpose(1, 2)

    valid = torch.arange(width, device=q.device).unsqueeze(0) < lengths.unsqueeze(1)
    out = _sdpa_padded(to_padded(q), to_padded(k), to_padded(v), valid, softmax_scale,
                       dropout_p)
    return out.transpose(1, 2).reshape(batch * width, heads, head_dim).index_select(0, slot)
