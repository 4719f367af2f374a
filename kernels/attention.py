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
pass for ``dQ``: no atomics, so gradients are deterministic run to run whichever tile
config the autotuner picks (each config's result is reproducible; two configs may differ
in the last bits, as any change of summation order does). (The atomic dQ variant saves one
recomputation of ``Q K^T``; which one is faster on H100 is still to be measured on a GPU.)

Tiles: on a GPU each of the three kernels autotunes over :data:`CONFIGS`, pruned per arch
by the compile audit's spill table (see there); the interpreter runs one fixed config.

Dropout on the attention probabilities uses Philox through ``tl.rand`` keyed by
``(seed + batch_head * 7919, query * max_seqlen + key)``: the backward regenerates the
exact mask of the forward from the same seed, with no mask tensor in memory.

Rows with no valid key produce zeros (not NaN) and zero gradients.

Accumulation is fp32 whatever the input dtype; fp32 inputs use IEEE fp32 dots (not TF32)
so fp32 results match the reference to ~1e-6.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET

__all__ = ["attention_forward", "attention_backward", "SUPPORTED_HEAD_DIMS",
           "not_supported_reasons"]

# Head dims the kernel takes; others are padded up to the next power of two with masked
# loads (BLOCK_D), so any head_dim <= 128 runs, at the cost of wasted lanes.
SUPPORTED_HEAD_DIMS = (32, 64, 128)
MAX_HEAD_DIM = 128
_LOG2E = 1.4426950408889634


# Tile configurations (BLOCK_M, BLOCK_N, num_warps, num_stages) each kernel's autotuner
# chooses from on a GPU, per dtype class (fp16/bf16, fp32). On a device whose arch the
# committed compile audit covers (sm_80, sm_90, sm_100), configs that spill registers there
# are pruned before timing (SPILLS below; where every config spills, the least spilling
# stay), so the first call times only configs that compile cleanly for that GPU. Not yet
# timed on a GPU: the sets hold the usual FlashAttention-2 starting points and the tiles the
# audit found spill-free where those spill (dK/dV at head_dim 128 spills 4-12 B on sm_90 at
# 64x64 on 8 warps, not at 32x64 or 64x32 on 4; dQ at 128 spills 4 B on sm_100 at 64x64).
# fp32 runs its IEEE dots on FMA units with large per-thread operand tiles: smaller tiles
# (at 128x64, forward and backward spilled 1-27 KB per thread).
CONFIGS = {
    "forward": {False: ((128, 64, 8, 3), (128, 32, 8, 2), (64, 64, 4, 3)),
                True: ((32, 32, 8, 1), (64, 32, 8, 2), (32, 32, 4, 2))},
    "dkdv": {False: ((64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 32, 4, 2)),
             True: ((32, 32, 8, 2), (32, 16, 4, 2), (16, 16, 4, 1))},
    "dq": {False: ((64, 64, 4, 2), (64, 64, 8, 2), (64, 32, 4, 2)),
           True: ((16, 32, 4, 2), (32, 16, 4, 2), (32, 32, 8, 2))},
}
# The interpreter cannot autotune: one fixed config. Measured there on a (6, 2, 130, 64)
# batch: 16x16 tiles took 2.2 s forward / 4.2 s backward and 32x32 0.7 s / 1.5 s, while
# sequences of 64..130 still span several tiles with partial last tiles.
_INTERPRETER_CONFIG = (32, 32, 1, 1)
# The delta preprocess (rowsum(dO * O)) streams two (BLOCK_M, BLOCK_D) tiles: 32 rows on
# 4 warps. At 64 rows the audit saw it spill on sm_100 (4 B in fp32 at head dim 64 with
# triton 3.7.1, 12 B in bf16 at head dim 128 with triton 3.6.0).
_DELTA_BLOCK_M = 32
# The committed spill table of the installed triton (register allocation differs between
# versions: kernels/attention_spills-triton<version>.json, written by ``python -m
# benchmarks.audit --write-spill-table``): spill bytes per (kernel, arch, dtype, BLOCK_D,
# VARLEN, HAS_DROPOUT, BLOCK_M, BLOCK_N, warps, stages). A triton without a table prunes
# nothing by arch: the autotuner then times every config of the dtype class.
_SPILLS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            f"attention_spills-triton{triton.__version__}.json")


def _load_spills() -> Dict[tuple, int]:
    try:
        with open(_SPILLS_FILE, encoding="utf-8") as handle:
            table = json.load(handle)
        if table["triton"] != triton.__version__:
            return {}
        entries = table["spills"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # no table for this triton: nothing is pruned by arch
    return {tuple(entry[:-1]): int(entry[-1]) for entry in entries}


SPILLS = _load_spills()
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _config_tuple(config) -> Tuple[int, int, int, int]:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps,
            config.num_stages)


def _device_arch(tensor: torch.Tensor) -> Optional[int]:
    if tensor.device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(tensor.device)
    return major * 10 + minor


def prune_configs(kernel: str, configs, named_args, **kwargs):
    """The autotuner's ``early_config_prune``: the dtype class's set, then (on an arch the
    spill table covers) :func:`least_spilling` for that arch."""
    fp32 = bool(kwargs["IEEE_FP32"])
    wanted = CONFIGS[kernel][fp32]
    configs = [c for c in configs if _config_tuple(c) in wanted]
    q = named_args["Q"]
    return least_spilling(kernel, _device_arch(q), _DTYPE_NAMES.get(q.dtype, ""),
                          (kwargs["BLOCK_D"], bool(kwargs["VARLEN"]),
                           bool(kwargs["HAS_DROPOUT"])), configs)


def least_spilling(kernel: str, arch: Optional[int], dtype: str, flags: tuple, configs,
                   spills: Optional[Dict[tuple, int]] = None) -> list:
    """The ``configs`` that spill least on ``arch`` by the spill table (all of them when
    none spills, or when the table does not cover ``arch``). ``flags``: (BLOCK_D, VARLEN,
    HAS_DROPOUT)."""
    table = SPILLS if spills is None else spills
    if arch is None or not any(key[1] == arch for key in table):
        return list(configs)
    bytes_of = {id(c): table.get((kernel, arch, dtype, *flags, *_config_tuple(c)), 0)
                for c in configs}
    least = min(bytes_of.values())
    return [c for c in configs if bytes_of[id(c)] == least]


def _tuned(kernel_name: str, fn):
    """``fn`` autotuned over every config of CONFIGS[kernel_name], keyed on the head-dim
    block, layout, dropout, dtype (the autotuner adds the tensors' dtypes) and a
    power-of-two sequence-length bucket; None in the interpreter (one fixed config)."""
    if _INTERPRET:
        return None
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
               for fp32 in (False, True) for (m, n, w, s) in CONFIGS[kernel_name][fp32]]
    return triton.autotune(
        configs=configs, key=["BLOCK_D", "VARLEN", "HAS_DROPOUT", "seq_bucket"],
        prune_configs_by={"early_config_prune": functools.partial(prune_configs,
                                                                  kernel_name)})(fn)


def _seq_bucket(max_seqlen: int) -> int:
    """The autotune key's sequence length: the next power of two, 64 to 4096."""
    return min(max(64, triton.next_power_of_2(max(int(max_seqlen), 1))), 4096)


def _launch(tuned, fn, grid, args, kwargs):
    """Launch the autotuned kernel (GPU) or ``fn`` with the interpreter's fixed config."""
    if tuned is not None:
        return tuned[grid](*args, **kwargs)
    block_m, block_n, num_warps, num_stages = _INTERPRETER_CONFIG
    meta = dict(kwargs, BLOCK_M=block_m, BLOCK_N=block_n)
    return fn[grid(meta)](*args, **meta, num_warps=num_warps, num_stages=num_stages)


@triton.jit
def _program(CU_SEQLENS, KEY_LENGTHS, num_heads, max_seqlen, VARLEN: tl.constexpr,
             HAS_KEY_LENGTHS: tl.constexpr):
    """This program's (block, batch_head, batch, head, first token, query rows, valid
    keys): axis 0 walks the blocks of one sequence, axis 1 the (batch, head) pairs."""
    block = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch, head = _batch_and_head(batch_head, num_heads)
    start, q_len, k_len = _sequence_bounds(CU_SEQLENS, KEY_LENGTHS, batch, max_seqlen,
                                           VARLEN, HAS_KEY_LENGTHS)
    return block, batch_head, batch, head, start, q_len, k_len


@triton.jit
def _dot(a, b, IEEE_FP32: tl.constexpr):
    """``a @ b`` accumulated in fp32: IEEE fp32 products for fp32 inputs (not TF32, so fp32
    matches the reference to ~1e-6), tensor cores in ``b``'s dtype otherwise (an fp32
    probability tile is rounded to it first)."""
    if IEEE_FP32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(b.dtype), b)


@triton.jit
def _head_base(PTR, batch, head, start, stride_batch, stride_head, stride_token):
    """Where one sequence of one head starts in a padded or packed tensor."""
    return PTR + batch * stride_batch + head * stride_head + start * stride_token


@triton.jit
def _load_rows(base, rows, row_ok, stride_token, offs_d, d_ok):
    """A (rows, BLOCK_D) tile; zeros outside the sequence and past head_dim."""
    return tl.load(base + rows[:, None] * stride_token + offs_d[None, :],
                   mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _store_rows(base, rows, row_ok, stride_token, offs_d, d_ok, tile):
    tl.store(base + rows[:, None] * stride_token + offs_d[None, :],
             tile.to(base.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _probabilities(q, k, lse, valid, scale_log2, IEEE_FP32: tl.constexpr):
    """The forward's softmax probabilities of a (query block, key block), rebuilt in the
    backward from the saved base-2 log-sum-exp; 0 outside the valid pairs."""
    s = _dot(q, tl.trans(k), IEEE_FP32)
    return tl.where(valid, tl.math.exp2(s * scale_log2 - lse[:, None]), 0.0)


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


@triton.jit(do_not_specialize=["seq_bucket"])
def _attention_forward_kernel(
    Q, K, V, OUT, LSE, CU_SEQLENS, KEY_LENGTHS,
    num_heads, max_seqlen, seq_bucket, head_dim, scale_log2, dropout_p, seed,
    stride_q_batch, stride_q_head, stride_q_token,
    stride_k_batch, stride_k_head, stride_k_token,
    stride_v_batch, stride_v_head, stride_v_token,
    stride_o_batch, stride_o_head, stride_o_token,
    stride_lse_bh,
    VARLEN: tl.constexpr, HAS_KEY_LENGTHS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    IEEE_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block_m, batch_head, batch, head, start, q_len, k_len = _program(
        CU_SEQLENS, KEY_LENGTHS, num_heads, max_seqlen, VARLEN, HAS_KEY_LENGTHS)
    if block_m * BLOCK_M >= q_len:
        return

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = offs_m < q_len
    k_base = _head_base(K, batch, head, start, stride_k_batch, stride_k_head, stride_k_token)
    v_base = _head_base(V, batch, head, start, stride_v_batch, stride_v_head, stride_v_token)
    q = _load_rows(_head_base(Q, batch, head, start, stride_q_batch, stride_q_head,
                              stride_q_token), offs_m, row_ok, stride_q_token, offs_d, d_ok)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for start_n in range(0, k_len, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_len
        k = _load_rows(k_base, cols, col_ok, stride_k_token, offs_d, d_ok)
        s = _dot(q, tl.trans(k), IEEE_FP32)
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
        v = _load_rows(v_base, cols, col_ok, stride_v_token, offs_d, d_ok)
        acc = acc * alpha[:, None] + _dot(p, v, IEEE_FP32)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    _store_rows(_head_base(OUT, batch, head, start, stride_o_batch, stride_o_head,
                           stride_o_token), offs_m, row_ok, stride_o_token, offs_d, d_ok, out)
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


@triton.jit(do_not_specialize=["seq_bucket"])
def _attention_backward_dkdv_kernel(
    Q, K, V, DOUT, DK, DV, LSE, DELTA, CU_SEQLENS, KEY_LENGTHS,
    num_heads, max_seqlen, seq_bucket, head_dim, softmax_scale, scale_log2, dropout_p, seed,
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
    block_n, batch_head, batch, head, start, q_len, k_len = _program(
        CU_SEQLENS, KEY_LENGTHS, num_heads, max_seqlen, VARLEN, HAS_KEY_LENGTHS)
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
    k = _load_rows(_head_base(K, batch, head, start, stride_k_batch, stride_k_head,
                              stride_k_token), offs_n, col_ok, stride_k_token, offs_d, d_ok)
    v = _load_rows(_head_base(V, batch, head, start, stride_v_batch, stride_v_head,
                              stride_v_token), offs_n, col_ok, stride_v_token, offs_d, d_ok)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    q_base = _head_base(Q, batch, head, start, stride_q_batch, stride_q_head, stride_q_token)
    do_base = _head_base(DOUT, batch, head, start, stride_do_batch, stride_do_head,
                         stride_do_token)
    n_query_blocks = tl.where(block_n * BLOCK_N < k_len, q_len, 0)
    for start_m in range(0, n_query_blocks, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < q_len
        q = _load_rows(q_base, rows, row_ok, stride_q_token, offs_d, d_ok)
        do = _load_rows(do_base, rows, row_ok, stride_do_token, offs_d, d_ok)
        lse = tl.load(LSE + batch_head * stride_lse_bh + rows, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + batch_head * stride_lse_bh + rows, mask=row_ok, other=0.0)
        p = _probabilities(q, k, lse, row_ok[:, None] & col_ok[None, :], scale_log2,
                           IEEE_FP32)
        dp = _dot(do, tl.trans(v), IEEE_FP32)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, batch_head, rows, offs_n, max_seqlen, dropout_p)
            p_used = tl.where(keep, p / (1.0 - dropout_p), 0.0)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        else:
            p_used = p
        ds = p * (dp - delta[:, None])
        dv += _dot(tl.trans(p_used), do, IEEE_FP32)
        dk += _dot(tl.trans(ds), q, IEEE_FP32)
    store_ok = offs_n < rows_in_memory
    _store_rows(_head_base(DK, batch, head, start, stride_dk_batch, stride_dk_head,
                           stride_dk_token), offs_n, store_ok, stride_dk_token, offs_d, d_ok,
                dk * softmax_scale)
    _store_rows(_head_base(DV, batch, head, start, stride_dv_batch, stride_dv_head,
                           stride_dv_token), offs_n, store_ok, stride_dv_token, offs_d, d_ok, dv)


@triton.jit(do_not_specialize=["seq_bucket"])
def _attention_backward_dq_kernel(
    Q, K, V, DOUT, DQ, LSE, DELTA, CU_SEQLENS, KEY_LENGTHS,
    num_heads, max_seqlen, seq_bucket, head_dim, softmax_scale, scale_log2, dropout_p, seed,
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
    block_m, batch_head, batch, head, start, q_len, k_len = _program(
        CU_SEQLENS, KEY_LENGTHS, num_heads, max_seqlen, VARLEN, HAS_KEY_LENGTHS)
    if block_m * BLOCK_M >= q_len:
        return
    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    row_ok = offs_m < q_len
    q = _load_rows(_head_base(Q, batch, head, start, stride_q_batch, stride_q_head,
                              stride_q_token), offs_m, row_ok, stride_q_token, offs_d, d_ok)
    do = _load_rows(_head_base(DOUT, batch, head, start, stride_do_batch, stride_do_head,
                               stride_do_token), offs_m, row_ok, stride_do_token, offs_d, d_ok)
    lse = tl.load(LSE + batch_head * stride_lse_bh + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + batch_head * stride_lse_bh + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    k_base = _head_base(K, batch, head, start, stride_k_batch, stride_k_head, stride_k_token)
    v_base = _head_base(V, batch, head, start, stride_v_batch, stride_v_head, stride_v_token)
    for start_n in range(0, k_len, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < k_len
        k = _load_rows(k_base, cols, col_ok, stride_k_token, offs_d, d_ok)
        v = _load_rows(v_base, cols, col_ok, stride_v_token, offs_d, d_ok)
        p = _probabilities(q, k, lse, row_ok[:, None] & col_ok[None, :], scale_log2,
                           IEEE_FP32)
        dp = _dot(do, tl.trans(v), IEEE_FP32)
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, batch_head, offs_m, cols, max_seqlen, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds, k, IEEE_FP32)
    _store_rows(_head_base(DQ, batch, head, start, stride_dq_batch, stride_dq_head,
                           stride_dq_token), offs_m, row_ok, stride_dq_token, offs_d, d_ok,
                dq * softmax_scale)


# ---------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------
_FORWARD = _tuned("forward", _attention_forward_kernel)
_DKDV = _tuned("dkdv", _attention_backward_dkdv_kernel)
_DQ = _tuned("dq", _attention_backward_dq_kernel)


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
    out: Optional[torch.Tensor] = None, *, check_arguments: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention forward.

    ``q, k, v``: padded ``(B, H, S, D)`` or packed ``(T, H, D)`` fp16/bf16/fp32 (unit stride
    over D). ``key_lengths``: ``(B,)`` int32/int64 or None (padded only). ``cu_seqlens``:
    ``(B+1,)`` int32/int64 (packed only) with ``max_seqlen``; any stride (copied to
    contiguous int32). ``seed``: int for the dropout RNG.
    ``out``: optional preallocated output shaped like ``q``. ``check_arguments=False``:
    the caller has checked them (the public op does, once).
    Returns ``(out, lse)`` with ``lse`` ``(B, H, max_seqlen)`` fp32 in base 2.
    """
    if check_arguments:  # False: spanbert_fast.ops checked them at its public boundary
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
    if batch * heads == 0 or seqlen == 0:
        return (out if target is None else target), lse
    dummy = lse  # stands in for absent pointer arguments; never read (constexpr-guarded)
    _launch(
        _FORWARD, _attention_forward_kernel,
        lambda meta: (triton.cdiv(seqlen, meta["BLOCK_M"]), batch * heads),
        (q, k, v, out, lse,
         cu_seqlens if varlen else dummy, key_lengths if key_lengths is not None else dummy,
         heads, seqlen, _seq_bucket(seqlen), head_dim, softmax_scale * _LOG2E,
         float(dropout_p), int(seed),
         *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
         *_strides(out, varlen), lse.stride(1)),
        dict(VARLEN=varlen, HAS_KEY_LENGTHS=key_lengths is not None,
             HAS_DROPOUT=dropout_p > 0.0, IEEE_FP32=q.dtype == torch.float32,
             BLOCK_D=block_d))
    if target is not None:
        out = target.copy_(out)
    return out, lse


def attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor,
    key_lengths: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], max_seqlen: int,
    softmax_scale: float, dropout_p: float, seed: int,
    grads_out: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None, *,
    check_arguments: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of the attention forward; shapes and dtypes of q, k, v.

    ``out`` and ``lse`` are the forward's results; ``seed`` must be the forward's.
    ``grads_out``: optional preallocated contiguous ``(dq, dk, dv)`` buffers.
    """
    if check_arguments:  # False: spanbert_fast.ops checked them at its public boundary
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
    dummy = lse
    cu = cu_seqlens if varlen else dummy
    lengths = key_lengths if key_lengths is not None else dummy
    _attention_backward_delta_kernel[(triton.cdiv(seqlen, _DELTA_BLOCK_M), batch * heads)](
        out, dout, delta, cu, heads, seqlen, head_dim,
        *_strides(out, varlen), *_strides(dout, varlen), delta.stride(1),
        VARLEN=varlen, BLOCK_M=_DELTA_BLOCK_M, BLOCK_D=block_d,
        num_warps=1 if _INTERPRET else 4)
    flags = dict(VARLEN=varlen, HAS_KEY_LENGTHS=key_lengths is not None,
                 HAS_DROPOUT=dropout_p > 0.0, IEEE_FP32=q.dtype == torch.float32,
                 BLOCK_D=block_d)
    scalars = (heads, seqlen, _seq_bucket(seqlen), head_dim, softmax_scale,
               softmax_scale * _LOG2E, float(dropout_p), int(seed))
    _launch(_DKDV, _attention_backward_dkdv_kernel,
            lambda meta: (triton.cdiv(seqlen, meta["BLOCK_N"]), batch * heads),
            (q, k, v, dout, dk, dv, lse, delta, cu, lengths, *scalars,
             *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
             *_strides(dout, varlen), *_strides(dk, varlen), *_strides(dv, varlen),
             lse.stride(1)), flags)
    _launch(_DQ, _attention_backward_dq_kernel,
            lambda meta: (triton.cdiv(seqlen, meta["BLOCK_M"]), batch * heads),
            (q, k, v, dout, dq, lse, delta, cu, lengths, *scalars,
             *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen),
             *_strides(dout, varlen), *_strides(dq, varlen), lse.stride(1)), flags)
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
