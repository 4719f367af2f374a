"""Pure-PyTorch versions of every fused op.

Each function here is two things at once: the ``torch`` backend that runs on any device,
and the oracle that the Triton kernels are tested against (tests import these functions;
they never re-derive an op inline). They take already-validated inputs: argument checking
lives in :mod:`spanbert_fast.ops`.

Conventions shared with the kernels:

* LayerNorm and softmax statistics are computed in fp32 (fp64 for fp64 inputs), and the
  result is cast back to the input dtype.
* Attention rows with no valid key produce zeros (not NaN).
* The mean cross-entropy over zero valid targets is 0.0 (torch gives NaN), so a batch
  without SBO targets does not poison the pretraining loss.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "attention",
    "layer_norm",
    "bias_gelu",
    "span_boundary_head",
    "linear_cross_entropy",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 inputs, fp64 for fp64 (the oracle runs in fp64)."""
    return torch.promote_types(dtype, torch.float32)


def _packed_to_padded_mask(cu_seqlens: torch.Tensor, max_seqlen: int):
    """(batch+1,) cu_seqlens -> (batch, max_seqlen) bool mask of valid positions."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
    positions = torch.arange(max_seqlen, device=cu_seqlens.device)
    return positions.unsqueeze(0) < lengths.unsqueeze(1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: int = 0,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    attn_bias: Optional[torch.Tensor] = None,
    upcast: bool = True,
) -> torch.Tensor:
    """Bidirectional scaled dot-product attention.

    Padded layout: ``q, k, v`` are ``(batch, heads, seq, head_dim)``; ``key_padding_mask``
    is ``(batch, seq)`` bool, True where a key may be attended to (None: all keys).
    Packed layout: ``q, k, v`` are ``(total_tokens, heads, head_dim)`` and ``cu_seqlens``
    is ``(batch + 1,)`` int32 cumulative lengths; ``max_seqlen`` bounds the lengths.
    ``attn_bias`` (padded layout only) is an additive float mask broadcastable to
    ``(batch, heads, seq, seq)``. Dropout (``dropout_p`` > 0) is applied to the attention
    probabilities with torch's global RNG, as transformers' eager BERT does.

    ``upcast=False`` computes in the input dtype (eager attention as plain torch runs it in
    fp16/bf16): the baseline of STYLE.md's 2x rule for low-precision kernels.

    Returns the context in the layout of ``q``. Query rows whose keys are all masked
    get zeros.
    """
    if cu_seqlens is not None:
        # Packed -> padded, attend, -> packed. Simple and obviously right; the Triton
        # kernel reads the packed layout directly.
        total, heads, head_dim = q.shape
        batch = cu_seqlens.numel() - 1
        valid = _packed_to_padded_mask(cu_seqlens, max_seqlen)
        flat_index = valid.reshape(-1).nonzero().squeeze(1)

        def to_padded(x: torch.Tensor) -> torch.Tensor:
            padded = x.new_zeros(batch * max_seqlen, heads, head_dim)
            padded = padded.index_copy(0, flat_index, x)
            return padded.view(batch, max_seqlen, heads, head_dim).transpose(1, 2)

        out = attention(to_padded(q), to_padded(k), to_padded(v), key_padding_mask=valid,
                        softmax_scale=softmax_scale, dropout_p=dropout_p, upcast=upcast)
        out = out.transpose(1, 2).reshape(batch * max_seqlen, heads, head_dim)
        return out.index_select(0, flat_index)

    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    acc = _compute_dtype(q.dtype) if upcast else q.dtype
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if attn_bias is not None:
        scores = scores + attn_bias.to(acc)
    empty_rows = None
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, None, :]
        scores = scores.masked_fill(~keep, float("-inf"))
        # A row whose keys are all masked would softmax to NaN; give it zeros instead.
        # Branch-free, so torch.compile traces it without a data-dependent guard.
        empty_rows = ~key_padding_mask.any(dim=-1)
        scores = scores.masked_fill(empty_rows[:, None, None, None], 0.0)
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs, v.to(acc))
    if empty_rows is not None:
        out = out.masked_fill(empty_rows[:, None, None, None], 0.0)
    return out.to(q.dtype)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    residual: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``LayerNorm(x + residual)`` over the last dimension with fp32 statistics.

    ``x`` and ``residual``: ``(..., hidden)``; ``weight``, ``bias``: ``(hidden,)``.
    Returns ``x``'s shape in the dtype of ``x + residual`` (type promotion): under autocast
    a bf16/fp16 sublayer output added to an fp32 residual stream stays fp32, as
    transformers' ``LayerNorm`` (an fp32 op under autocast) keeps it.
    """
    h = x if residual is None else x + residual
    acc = _compute_dtype(h.dtype)
    out = F.layer_norm(h.to(acc), (h.shape[-1],), weight.to(acc), bias.to(acc), eps)
    return out.to(h.dtype)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Exact (erf) ``GELU(x + bias)``; ``x``: ``(..., features)``, ``bias``: ``(features,)``.
    Returns ``x``'s dtype (an fp32 bias under autocast does not promote the activations)."""
    return F.gelu(x + bias).to(x.dtype)


def span_boundary_head(
    hidden: torch.Tensor,
    left_index: torch.Tensor,
    right_index: torch.Tensor,
    rel_pos: torch.Tensor,
    position_table: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    ln1_weight: torch.Tensor,
    ln1_bias: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    ln2_weight: torch.Tensor,
    ln2_bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """SpanBERT's span-boundary representation (the SBO MLP, before the decoder).

    ``hidden``: ``(tokens, H)`` encoder outputs, flattened over the batch.
    ``left_index``, ``right_index``: ``(N,)`` int64 rows of ``hidden`` holding the span's
    outer boundaries ``h[s-1]`` and ``h[e+1]``; ``rel_pos``: ``(N,)`` int64 position of the
    target inside its span (0-based) indexing ``position_table`` ``(P, E)``.
    ``w1``: ``(H, 2H + E)``, ``w2``: ``(H, H)``; biases and LayerNorm params ``(H,)``.

    ``y = LN2(GELU(W2 · LN1(GELU(W1 · [h_left; h_right; p] + b1)) + b2))`` -> ``(N, H)``.
    """
    features = torch.cat(
        [hidden.index_select(0, left_index), hidden.index_select(0, right_index),
         position_table.index_select(0, rel_pos)], dim=-1)
    y = layer_norm(bias_gelu(F.linear(features, w1), b1), ln1_weight, ln1_bias, eps)
    return layer_norm(bias_gelu(F.linear(y, w2), b2), ln2_weight, ln2_bias, eps)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` against ``labels``.

    ``hidden``: ``(N, H)``; ``weight``: ``(V, H)`` (the tied word embeddings);
    ``bias``: ``(V,)`` or None; ``labels``: ``(N,)`` int64, ``ignore_index`` entries skipped.
    Log-sum-exp in fp32 (fp64 for fp64 inputs). Returns a 0-d tensor of that dtype: the mean over valid labels, 0.0 when
    there are none (torch's ``cross_entropy`` would return NaN).
    """
    logits = F.linear(hidden, weight, bias)
    logits = logits.to(_compute_dtype(logits.dtype))
    total = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    count = (labels != ignore_index).sum().clamp_min(1)
    return total / count
