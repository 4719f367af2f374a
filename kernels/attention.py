"""Fused bidirectional attention (FlashAttention-2 style), forward and backward, in Triton.

One kernel family serves two layouts:

* padded: ``q, k, v, out`` of shape ``(batch, heads, seq, head_dim)`` (any strides with a
  unit stride over ``head_dim``) plus ``key_lengths`` ``(batch,)`` int32: keys at positions
  ``>= key_lengths[b]`` are padding. Every query row is computed (padded query rows attend
  to the real keys, as an additive-mask implementation would).
* packed: ``q, k, v, out`` of shape ``(total_tokens, heads, head_dim)`` with ``cu_seqlens``
  ``(batch + 1,)`` int32 and ``max_seqlen``, as ``flash_attn_varlen_func`` takes them.

The forward never materialises the ``(seq x seq)`` scores: it streams key/value blocks
through an online softmax in base 2 (``exp2`` of scores pre-scaled by ``log2(e)``) and
saves the per-row log-sum-exp ``lse`` (fp32, base 2) for the backward. The backward runs a
preprocess (``delta = rowsum(dO * O)``), a key-block pass for ``dK, dV`` and a query-block
pass for ``dQ``: no atomics, so gradients are deterministic run to run. (The atomic dQ
variant saves one recomputation of ``Q K^T``; which one is faster on H100 is still to be
measured on a GPU.)

Dropout on the attention probabilities uses Philox through ``tl.rand`` keyed by
``(seed + batch_head * 7919, query * max_seqlen + key)``: the backward regenerates the
exact mask of the forward from the same seed, with no mask tensor in memory.

Rows with no valid key produce zeros (not NaN) and zero gradients.

Accumulation is fp32 whatever the input dtype; fp32 inputs use IEEE fp32 dots (not TF32)
so fp32 results match the reference to ~1e-6.
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

__all__ = ["attention_forward", "attention_backward", "SUPPORTED_HEAD_DIMS",
           "not_supported_reasons"]

# Head dims the kernel takes; others are padded up to the next power of two with masked
# loads (BLOCK_D), so any head_dim <= 128 runs, at the cost of wasted lanes.
SUPPORTED_HEAD_DIMS = (32, 64, 128)
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _block_sizes(head_dim_block: int, is_backward: bool) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages).

    Not yet tuned on a GPU (no device measured so far): these follow the usual
    FlashAttention-2 starting points for Hopper (128x64 tiles for head_dim <= 64 in the
    forward, 64x64 in the backward, whose five tiles per step need more registers).
    The forward's 128x64 tile runs on 8 warps: on 4 the compile audit (``python -m
    benchmarks.audit``, triton 3.7.1) measured 255 registers and spills in bf16/fp16 on
    sm_80 (8-24 bytes), sm_90 (24 bytes at head_dim 32 with dropout) and sm_100 (~730
    bytes with dropout); on 8 warps it needs at most 226 registers and spills nowhere.
    The interpreter gets 32x32 tiles: measured there on a (6, 2, 130, 64) batch, 16x16
    tiles took 2.2 s forward / 4.2 s backward and 32x32 0.7 s / 1.5 s, while sequences of
    64..130 still span several tiles with partial last tiles.
    """
    if _INTERPRET:
        return 32, 32, 1, 1
    if is_backward:
        return 64, 64, 4 if head_dim_block <= 64 else 8, 2
    if head_dim_block <= 64:
        return 128, 64, 8, 3
    return 128, 32, 8, 2


@triton.jit
def _dropout_keep(seed, batch_head, offs_m, offs_n, max_seqlen, dropout_p):
    """Boolean keep-mask (BLOCK_M, BLOCK_N) for dropout, identical in forward and backward."""
    rng_offsets = offs_m[:, None] * max_seqlen + offs_n[None, :]
    return tl.rand(seed + batch_head * 7919, rng_offsets) >= dropout_p


@triton.jit
def _batch_and_head(batch_head, num_heads):
    """(batch, head) of a program as int64: ``batch * stride_batch`` passes 2**31 once a
    tensor has more elements than that (e.g. 5,462 x 512 tokens at hidden 768), and int32
    arithmetic would wrap to a wrong address."""
    return (batch_head // num_heads).to(tl.int64), (batch_head % num_heads).to(tl.int64)


@triton.jit
def _sequence_bounds(CU_SEQLENS, KEY_LENGTHS, batch, max_seqlen, VARLEN: tl.constexpr,
                     HAS_KEY_LENGTHS: tl.constexpr):
    """(first token, number of query rows, number of valid keys) of one sequence."""
    if VARLEN:
        start = tl.load(CU_SEQLENS + batch)
        end = tl.load(CU_SEQLENS + batch + 1)
        q_len = end - start
        k_len = q_len
        start = start.to(tl.int64)  # start * stride_token passes 2**31 past ~2.8M tokens
    else:
        start = 0
        q_len = max_seqlen
        if HAS_KEY_LENGTHS:
            k_len = tl.load(KEY_LENGTHS + batch)
        else:
            k_len = max_seqlen
    return start, q_len, k_len


@triton.jit
def _attention_forward_kernel(
    Q, K, V, OUT, LSE, CU_SEQLENS, KEY_LENGTHS,
    num_heads, max_seqlen, head_dim, scale_log2, dropout_p, seed,
    stride_q_batch, stride_q_head, stride_q_token,
    stride_k_batch, stride_k_head, stride_k_token,
    stride_v_batch, stride_v_head, stride_v_token,
    stride_o_batch, stride_o_head, stride_o_token,
    stride_lse_bh,
    VARLEN: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch, head = _batch_and_head(batch_head, num_heads)
    start, q_len, k_len = _sequence_bounds(CU_SEQLENS, KEY_LENGTHS, batch, max_seqlen,
                                           VARLEN, HAS_KEY_LENGTHS)
    if block_m * BLOCK_M >= q_len:
        return

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q_base = Q + batch * stride_q_batch + head * stride_q_head + start * stride_q_token
    k_base = K + batch * stride_k_batch + head * stride_k_head + start * stride_k_token
    v_base = V + batch * stride_v_batch + head * stride_v_head + start * stride_v_token
    q = tl.load(q_base + offs_m[:, None] * stride_q_token + offs_d[None, :],
                mask=(offs_m[:, None] < q_len) & d_ok[None, :], other=0.0)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, k_len, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_len
        k = tl.load(k_base + cols[:, None] * stride_k_token + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE_FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(col_ok[None, :], s * scale_log2, float("-inf"))
        # Every block holds at least one valid key (the loop stops at k_len), so m_new is
        # finite and alpha never computes -inf - -inf.
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, batch_head, offs_m, cols, max_seqlen, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        v = tl.load(v_base + cols[:, None] * stride_v_token + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    row_ok = offs_m < q_len
    o_base = OUT + batch * stride_o_batch + head * stride_o_head + start * stride_o_token
    tl.store(o_base + offs_m[:, None] * stride_o_token + offs_d[None, :],
             out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), 0.0)
    tl.store(LSE + batch_head * stride_lse_bh + offs_m, lse, mask=row_ok)


@triton.jit
def _attention_backward_delta_kernel(
    OUT, DOUT, DELTA, CU_SEQLENS,
    num_heads, max_seqlen, head_dim,
    stride_o_batch, stride_o_head, stride_o_token,
    stride_do_batch, stride_do_head, stride_do_token,
    stride_delta_bh,
    VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d dO[i, d] * O[i, d] (fp32): the row term of softmax's backward."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch, head = _batch_and_head(batch_head, num_heads)
    start, q_len, _ = _sequence_bounds(CU_SEQLENS, CU_SEQLENS, batch, max_seqlen, VARLEN, False)
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < q_len) & (offs_d[None, :] < head_dim)
    o = tl.load(OUT + batch * stride_o_batch + head * stride_o_head + start * stride_o_token
                + offs_m[:, None] * stride_o_token + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DOUT + batch * stride_do_batch + head * stride_do_head + start * stride_do_token
                 + offs_m[:, None] * stride_do_token + offs_d[None, :], mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + batch_head * stride_delta_bh + offs_m, delta, mask=offs_m < q_len)


@triton.jit
def _attention_backward_dkdv_kernel(
    Q, K, V, DOUT, DK, DV, LSE, DELTA, CU_SEQLENS, KEY_LENGTHS,
    num_heads, max_seqlen, head_dim, softmax_scale, scale_log2, dropout_p, seed,
    stride_q_batch, stride_q_head, stride_q_token,
    stride_k_batch, stride_k_head, stride_k_token,
    stride_v_batch, stride_v_head, stride_v_token,
    stride_do_batch, stride_do_head, stride_do_token,
    stride_dk_batch, stride_dk_head, stride_dk_token,
    stride_dv_batch, stride_dv_head, stride_dv_token,
    stride_lse_bh,
    VARLEN: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One key block: dV = sum_i P^T dO, dK = scale * sum_i dS^T Q over all query blocks."""
    block_n = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch, head = _batch_and_head(batch_head, num_heads)
    start, q_len, k_len = _sequence_bounds(CU_SEQLENS, KEY_LENGTHS, batch, max_seqlen,
                                           VARLEN, HAS_KEY_LENGTHS)
    # Rows that exist in memory for this sequence: padded keys exist (their gradient is 0
    # and must still be written), packed sequences end at q_len.
    rows_in_memory = q_len
    if block_n * BLOCK_N >= rows_in_memory:
        return
    offs_n = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    col_ok = offs_n < k_len
    k = tl.load(K + batch * stride_k_batch + head * stride_k_head + start * stride_k_token
                + offs_n[:, None] * stride_k_token + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    v = tl.load(V + batch * stride_v_batch + head * stride_v_head + start * stride_v_token
                + offs_n[:, None] * stride_v_token + offs_d[None, :],
                mask=col_ok[:, None] & d_ok[None, :], other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    q_base = Q + batch * stride_q_batch + head * stride_q_head + start * stride_q_token
    do_base = DOUT + batch * stride_do_batch + head * stride_do_head + start * stride_do_token
    n_query_blocks = tl.where(block_n * BLOCK_N < k_len, q_len, 0)
    for start_m in range(0, n_query_blocks, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < q_len
        q = tl.load(q_base + rows[:, None] * stride_q_token + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_do_token + offs_d[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse = tl.load(LSE + batch_head * stride_lse_bh + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + batch_head * stride_lse_bh + rows, mask=row_ok, other=0.0)
        if IEEE_FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        valid = row_ok[:, None] & col_ok[None, :]
        p = tl.where(valid, tl.math.exp2(s * scale_log2 - lse[:, None]), 0.0)
        if IEEE_FP32:
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            dp = tl.dot(do, tl.trans(v))
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, batch_head, rows, offs_n, max_seqlen, dropout_p)
            p_used = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        else:
            p_used = p
        ds = p * (dp - delta[:, None])
        if IEEE_FP32:
            dv += tl.dot(tl.trans(p_used), do, input_precision="ieee")
            dk += tl.dot(tl.trans(ds), q, input_precision="ieee")
        else:
            dv += tl.dot(tl.trans(p_used.to(do.dtype)), do)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    store_ok = (offs_n[:, None] < rows_in_memory) & d_ok[None, :]
    tl.store(DK + batch * stride_dk_batch + head * stride_dk_head + start * stride_dk_token
             + offs_n[:, None] * stride_dk_token + offs_d[None, :],
             (dk * softmax_scale).to(DK.dtype.element_ty), mask=store_ok)
    tl.store(DV + batch * stride_dv_batch + head * stride_dv_head + start * stride_dv_token
             + offs_n[:, None] * stride_dv_token + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=store_ok)


@triton.jit
def _attention_backward_dq_kernel(
    Q, K, V, DOUT, DQ, LSE, DELTA, CU_SEQLENS, KEY_LENGTHS,
    num_heads, max_seqlen, head_dim, softmax_scale, scale_log2, dropout_p, seed,
    stride_q_batch, stride_q_head, stride_q_token,
    stride_k_batch, stride_k_head, stride_k_token,
    stride_v_batch, stride_v_head, stride_v_token,
    stride_do_batch, stride_do_head, stride_do_token,
    stride_dq_batch, stride_dq_head, stride_dq_token,
    stride_lse_bh,
    VARLEN: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One query block: dQ = scale * sum_j dS K over the valid key blocks."""
    block_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch, head = _batch_and_head(batch_head, num_heads)
    start, q_len, k_len = _sequence_bounds(CU_SEQLENS, KEY_LENGTHS, batch, max_seqlen,
                                           VARLEN, HAS_KEY_LENGTHS)
    if block_m * BLOCK_M >= q_len:
        return
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = offs_m < q_len
    q = tl.load(Q + batch * stride_q_batch + head * stride_q_head + start * stride_q_token
                + offs_m[:, None] * stride_q_token + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DOUT + batch * stride_do_batch + head * stride_do_head + start * stride_do_token
                 + offs_m[:, None] * stride_do_token + offs_d[None, :],
                 mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(LSE + batch_head * stride_lse_bh + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + batch_head * stride_lse_bh + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    k_base = K + batch * stride_k_batch + head * stride_k_head + start * stride_k_token
    v_base = V + batch * stride_v_batch + head * stride_v_head + start * stride_v_token
    for start_n in range(0, k_len, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_len
        k = tl.load(k_base + cols[:, None] * stride_k_token + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + cols[:, None] * stride_v_token + offs_d[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        if IEEE_FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
            dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
            dp = tl.dot(do, tl.trans(v))
        p = tl.where(row_ok[:, None] & col_ok[None, :],
                     tl.math.exp2(s * scale_log2 - lse[:, None]), 0.0)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, batch_head, offs_m, cols, max_seqlen, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        if IEEE_FP32:
            dq += tl.dot(ds, k, input_precision="ieee")
        else:
            dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + batch * stride_dq_batch + head * stride_dq_head + start * stride_dq_token
             + offs_m[:, None] * stride_dq_token + offs_d[None, :],
             (dq * softmax_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------
def _strides(x: torch.Tensor, varlen: bool) -> Tuple[int, int, int]:
    """(batch, head, token) strides; packed tensors have no batch stride."""
    if varlen:
        return 0, x.stride(1), x.stride(0)
    return x.stride(0), x.stride(1), x.stride(2)


def _indexable(x: torch.Tensor, varlen: bool, rows: int) -> bool:
    """Whether the kernels can address ``x`` in place: a unit stride over head_dim, and
    in-sequence offsets (row * token stride, int32 products in the inner loops) below 2**31.
    Batch, head and sequence-start offsets are int64 in the kernels, so any size passes."""
    token_stride = x.stride(0) if varlen else x.stride(2)
    return x.stride(-1) == 1 and token_stride * max(rows, 1) < 2**31


def _kernel_view(x: torch.Tensor, varlen: bool, rows: int) -> torch.Tensor:
    """``x``, or a contiguous copy where the kernels cannot address it (e.g. a seq-first
    (S, B, H, D) tensor of more than 2**31 elements permuted to (B, H, S, D))."""
    return x if _indexable(x, varlen, rows) else x.contiguous()


def _check_inputs(q, k, v, key_lengths, cu_seqlens) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if t.shape != q.shape or t.dtype != q.dtype:
            raise ValueError(f"{name} must match q's shape {tuple(q.shape)} and dtype {q.dtype}, "
                             f"got {tuple(t.shape)} {t.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be <= {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if cu_seqlens is not None:
        if q.dim() != 3:
            raise ValueError(f"packed q must be (total_tokens, heads, head_dim), got {tuple(q.shape)}")
        if cu_seqlens.dtype not in _INDEX_DTYPES or cu_seqlens.dim() != 1:
            raise TypeError(f"cu_seqlens must be a 1-D int32 or int64 tensor, got "
                            f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    else:
        if q.dim() != 4:
            raise ValueError(f"padded q must be (batch, heads, seq, head_dim), got {tuple(q.shape)}")
        if key_lengths is not None and (key_lengths.dtype not in _INDEX_DTYPES
                                        or tuple(key_lengths.shape) != (q.shape[0],)):
            raise ValueError(f"key_lengths must be int32 or int64 of shape ({q.shape[0]},), "
                             f"got {key_lengths.dtype} {tuple(key_lengths.shape)}")


_INDEX_DTYPES = (torch.int32, torch.int64)


def _contiguous_int32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """cu_seqlens / key_lengths as the kernels read them: ``CU_SEQLENS + b`` assumes a unit
    stride and int32 values. Callers hand int64 (``torch.cumsum``'s dtype) or a column of a
    wider tensor; the copy is batch + 1 integers. Values are token counts, < 2**31."""
    return None if t is None else t.to(torch.int32).contiguous()


def _layout(q, cu_seqlens, max_seqlen):
    """(batch, heads, max_seqlen, varlen)."""
    if cu_seqlens is not None:
        return cu_seqlens.numel() - 1, q.shape[1], int(max_seqlen), True
    return q.shape[0], q.shape[1], q.shape[2], False


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    key_lengths: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], max_seqlen: int,
    softmax_scale: float, dropout_p: float, seed: int,
    out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention forward.

    ``q, k, v``: padded ``(B, H, S, D)`` or packed ``(T, H, D)`` fp16/bf16/fp32 (unit stride
    over D). ``key_lengths``: ``(B,)`` int32/int64 or None (padded only). ``cu_seqlens``:
    ``(B+1,)`` int32/int64 (packed only) with ``max_seqlen``; any stride (copied to
    contiguous int32). ``seed``: int for the dropout RNG.
    ``out``: optional preallocated output shaped like ``q``.
    Returns ``(out, lse)`` with ``lse`` ``(B, H, max_seqlen)`` fp32 in base 2.
    """
    _check_inputs(q, k, v, key_lengths, cu_seqlens)
    batch, heads, seqlen, varlen = _layout(q, cu_seqlens, max_seqlen)
    q, k, v = (_kernel_view(t, varlen, seqlen) for t in (q, k, v))
    key_lengths, cu_seqlens = _contiguous_int32(key_lengths), _contiguous_int32(cu_seqlens)
    head_dim = q.shape[-1]
    target = None  # a caller's out the kernels cannot address: written through a copy
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must have q's shape {tuple(q.shape)} and dtype {q.dtype} with a "
                         f"unit last stride, got {tuple(out.shape)} {out.dtype}")
    elif not _indexable(out, varlen, seqlen):
        target, out = out, torch.empty_like(q, memory_format=torch.contiguous_format)
    # Zeroed, not empty: in the packed layout rows past a sequence's end are never written,
    # and a returned tensor must not carry uninitialised memory (it is batch*heads*seq floats).
    lse = torch.zeros((batch, heads, seqlen), device=q.device, dtype=torch.float32)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = _block_sizes(block_d, is_backward=False)
    grid = (triton.cdiv(max(seqlen, 1), block_m), batch * heads)
    if batch * heads == 0 or seqlen == 0:
        return (out if target is None else target), lse
    dummy = lse  # stands in for absent pointer arguments; never read (constexpr-guarded)
    _attention_forward_kernel[grid](
        q, k, v, out, lse,
        cu_seqlens if varlen else dummy, key_lengths if key_lengths is not None else dummy,
        heads, seqlen, head_dim, softmax_scale * _LOG2E, float(dropout_p), int(seed),
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(out, varlen),
        lse.stride(1),
        VARLEN=varlen, HAS_KEY_LENGTHS=key_lengths is not None, HAS_DROPOUT=dropout_p > 0.0,
        IEEE_FP32=q.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages,
    )
    if target is not None:
        out = target.copy_(out)
    return out, lse


def attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    key_lengths: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], max_seqlen: int,
    softmax_scale: float, dropout_p: float, seed: int,
    grads_out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of the attention forward; shapes and dtypes of q, k, v.

    ``out`` and ``lse`` are the forward's results; ``seed`` must be the forward's.
    ``grads_out``: optional preallocated contiguous ``(dq, dk, dv)`` buffers.
    """
    _check_inputs(q, k, v, key_lengths, cu_seqlens)
    batch, heads, seqlen, varlen = _layout(q, cu_seqlens, max_seqlen)
    q, k, v, out, dout = (_kernel_view(t, varlen, seqlen) for t in (q, k, v, out, dout))
    key_lengths, cu_seqlens = _contiguous_int32(key_lengths), _contiguous_int32(cu_seqlens)
    # The kernels index lse (and delta, allocated like it) as LSE + batch_head * stride(1) +
    # row: contiguous (B, H, S) only. A copy is B * H * S floats.
    lse = lse.contiguous()
    head_dim = q.shape[-1]
    if grads_out is not None:
        dq, dk, dv = grads_out
        for name, buf, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
            if buf.shape != like.shape or buf.dtype != like.dtype or not buf.is_contiguous():
                raise ValueError(f"grads_out {name} must be contiguous {tuple(like.shape)} "
                                 f"{like.dtype}, got {tuple(buf.shape)} {buf.dtype}")
    else:
        dq = torch.empty_like(q, memory_format=torch.contiguous_format)
        dk = torch.empty_like(k, memory_format=torch.contiguous_format)
        dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    if batch * heads == 0 or seqlen == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = _block_sizes(block_d, is_backward=True)
    dummy = lse
    cu = cu_seqlens if varlen else dummy
    lengths = key_lengths if key_lengths is not None else dummy
    common = dict(VARLEN=varlen, HAS_KEY_LENGTHS=key_lengths is not None,
                  HAS_DROPOUT=dropout_p > 0.0, IEEE_FP32=q.dtype == torch.float32,
                  BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                  num_warps=num_warps, num_stages=num_stages)
    _attention_backward_delta_kernel[(triton.cdiv(seqlen, block_m), batch * heads)](
        out, dout, delta, cu, heads, seqlen, head_dim,
        *_strides(out, varlen), *_strides(dout, varlen), delta.stride(1),
        VARLEN=varlen, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=num_warps)
    scalars = (heads, seqlen, head_dim, softmax_scale, softmax_scale * _LOG2E,
               float(dropout_p), int(seed))
    _attention_backward_dkdv_kernel[(triton.cdiv(seqlen, block_n), batch * heads)](
        q, k, v, dout, dk, dv, lse, delta, cu, lengths, *scalars,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
        *_strides(dout, varlen), *_strides(dk, varlen), *_strides(dv, varlen),
        lse.stride(1), **common)
    _attention_backward_dq_kernel[(triton.cdiv(seqlen, block_m), batch * heads)](
        q, k, v, dout, dq, lse, delta, cu, lengths, *scalars,
        *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
        *_strides(dout, varlen), *_strides(dq, varlen),
        lse.stride(1), **common)
    return dq, dk, dv


_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def not_supported_reasons(tensors: Sequence[torch.Tensor]) -> List[str]:
    """Why these kernels cannot take inputs led by ``q`` (the public op's ``q, k, v, ...``);
    an empty list when they can. Read by the dispatcher (``spanbert_fast.ops``), which
    lists every reason under an explicit ``backend="triton"`` and falls back under "auto".
    A non-float first tensor (the model asking with its ids) is no reason."""
    if not tensors or not tensors[0].is_floating_point():
        return []
    q = tensors[0]
    reasons = []
    if q.dtype not in _KERNEL_DTYPES:
        reasons.append(f"the attention kernel takes fp16/bf16/fp32, got {q.dtype}")
    if q.dim() >= 3 and q.shape[-1] > MAX_HEAD_DIM:
        reasons.append(f"the attention kernel takes head_dim <= {MAX_HEAD_DIM}, "
                       f"got {q.shape[-1]}")
    return reasons
