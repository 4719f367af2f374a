"""Fused bias-add + exact (erf) GELU, forward and backward, in Triton.

``y = GELU(x + bias)`` with ``GELU(z) = z * Phi(z) = 0.5 * z * (1 + erf(z / sqrt(2)))``, the
exact GELU of BERT/SpanBERT (``hidden_act="gelu"``), not the tanh approximation. It follows
the FFN's first GEMM (``(tokens, 3072)`` in base, ``(tokens, 4096)`` in large) and the SBO
head's linears.

erf: ``tl.math.erf`` (also ``tl.erf``) is a core Triton op in 3.6 and 3.7.1. Under
``TRITON_INTERPRET=1`` the 3.7.1 interpreter evaluates it with Python's ``math.erf`` per
element (measured: max abs error 3.0e-8 against fp64 ``torch.erf`` on 1000 fp32 samples of
N(0, 9), i.e. correctly rounded), and on NVIDIA GPUs it lowers to libdevice's ``__nv_erff``
(2 ulp), so no polynomial approximation is needed. (``triton.language.extra.libdevice.erf``
is the one that fails in the interpreter.)

The math runs in fp32 for fp16/bf16/fp32 inputs (fp64 for fp64): ``x + bias`` is added in
fp32, one rounding fewer than torch's ``F.gelu(x + bias)`` in half precision.

``dbias`` is the column sum of ``dx`` over all rows. The backward runs a fixed number of
row-programs per column block; each walks row tiles with a grid stride, accumulates its
column sums in fp32 registers and writes one row of a ``(programs, features)`` partial
buffer that ``torch.sum`` reduces. No atomics, so ``dbias`` is deterministic.

Entry points (the op registry in ``spanbert_fast.ops`` imports them):

* :func:`forward` ``(x, bias) -> GELU(x + bias)``
* :func:`backward` ``(grad_output, x, bias, needs_input_grad) -> [dx, dbias]``

Not wired into ``spanbert_fast.ops`` yet: :func:`forward_with_dropout` /
:func:`backward_with_dropout` add inverted dropout after the GELU (BERT's FFN has none
there, but SBO-style heads and experiments may). The keep mask is never stored: it is
``tl.rand(seed, row * features + col) >= p``, a counter-based Philox draw that the
backward regenerates exactly from the same seed, whatever tile shapes either pass used.
"""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET
from ._common import (check_float_tensor, check_grad_output, empty_buffer, gelu_erf,
                      gelu_erf_derivative, needs_flags, tl_accumulator_dtype)

__all__ = ["forward", "backward", "forward_with_dropout", "backward_with_dropout",
           "not_supported_reasons"]



# Testing hook: when True, every buffer the launchers allocate (outputs and dbias partials)
# is filled with NaN first, so an element a kernel fails to write shows up as NaN in the
# result. Tests switch it on with monkeypatch; it costs a fill per buffer.
POISON_BUFFERS = False


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return empty_buffer(shape, dtype, device, POISON_BUFFERS)


# Tile shapes. GPU: a small autotuned set keyed on the feature count (never on the row
# count, which changes with every unpadded batch and would retune each step). Starting
# points, not yet measured on a GPU: 2-8K elements per program, 4 or 8 warps, so each
# thread moves 16-byte vectors. Interpreter: one fixed config; wide tiles mean fewer
# programs, and the interpreter's cost is per program and per op, not per element.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=num_warps)
    for block_m, block_n, num_warps in [
        (8, 256, 4), (16, 256, 4), (4, 1024, 4), (8, 512, 4), (8, 1024, 8), (16, 512, 8),
    ]
]
_INTERPRET_BLOCK_M = 16
_INTERPRET_MAX_BLOCK_N = 1024


@triton.jit
def _dropout_keep(seed, rows, cols, n_cols, dropout_p):
    """(BLOCK_M, BLOCK_N) keep mask: element (row, col) is kept iff
    ``tl.rand(seed, row * n_cols + col) >= dropout_p``. int32 counters: the launcher
    rejects tensors of 2**31 elements or more, so no two elements share a counter."""
    offsets = rows[:, None] * n_cols + cols[None, :]
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def _bias_gelu_forward_kernel(
    X, BIAS, Y,
    n_rows, n_cols, dropout_p, seed,
    stride_x_row, stride_y_row,
    HAS_DROPOUT: tl.constexpr, ACC_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``Y = GELU(X + BIAS)`` on one (BLOCK_M, BLOCK_N) tile, then, if HAS_DROPOUT,
    ``Y * keep / (1 - dropout_p)`` with the keep mask of :func:`_dropout_keep`.

    X: (n_rows, n_cols) fp16/bf16/fp32/fp64, unit column stride. BIAS: (n_cols,) any
    float dtype, contiguous. Y: (n_rows, n_cols) X's dtype. Math in ACC_DTYPE.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)  # rows * stride may pass 2**31
    x = tl.load(X + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0)
    b = tl.load(BIAS + cols, mask=col_ok, other=0.0)
    z = x.to(ACC_DTYPE) + b.to(ACC_DTYPE)[None, :]
    y = gelu_erf(z)
    if HAS_DROPOUT:
        keep = _dropout_keep(seed, rows, cols, n_cols, dropout_p)
        y = tl.where(keep, y / (1.0 - dropout_p), 0.0)
    tl.store(Y + rows64[:, None] * stride_y_row + cols[None, :],
             y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_backward_kernel(
    DY, X, BIAS, DX, DBIAS_PARTIAL,
    n_rows, n_cols, dropout_p, seed,
    stride_dy_row, stride_x_row, stride_dx_row, stride_partial_row,
    HAS_DROPOUT: tl.constexpr, STORE_DX: tl.constexpr, COMPUTE_DBIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """``DX = DY * GELU'(X + BIAS)`` (times ``keep / (1 - dropout_p)`` if HAS_DROPOUT)
    and per-program column sums of DX.

    Grid (programs, cdiv(n_cols, BLOCK_N)): program (p, c) handles row tiles p,
    p + programs, ... of column block c.
    DY, X: (n_rows, n_cols), unit column stride. BIAS: (n_cols,), contiguous.
    DX: (n_rows, n_cols) X's dtype, written if STORE_DX.
    DBIAS_PARTIAL: (programs, n_cols) ACC_DTYPE, row p written if COMPUTE_DBIAS (zeros
    when p has no rows, so every element is written).
    """
    pid_m = tl.program_id(0)
    programs = tl.num_programs(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    b = tl.load(BIAS + cols, mask=col_ok, other=0.0).to(ACC_DTYPE)
    dbias_acc = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    for row_start in range(pid_m * BLOCK_M, n_rows, programs * BLOCK_M):
        rows = row_start + tl.arange(0, BLOCK_M)
        mask = (rows < n_rows)[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(X + rows64[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(DY + rows64[:, None] * stride_dy_row + cols[None, :], mask=mask,
                     other=0.0)
        dx = dy.to(ACC_DTYPE) * gelu_erf_derivative(x.to(ACC_DTYPE) + b[None, :])  # 0 off-mask
        if HAS_DROPOUT:
            keep = _dropout_keep(seed, rows, cols, n_cols, dropout_p)
            dx = tl.where(keep, dx / (1.0 - dropout_p), 0.0)
        if STORE_DX:
            tl.store(DX + rows64[:, None] * stride_dx_row + cols[None, :],
                     dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DBIAS:
            dbias_acc += tl.sum(dx, axis=0)
    if COMPUTE_DBIAS:
        tl.store(DBIAS_PARTIAL + pid_m * stride_partial_row + cols, dbias_acc, mask=col_ok)


if _INTERPRET:
    # The interpreter cannot run a multi-config autotune; the launchers pass one config.
    _forward_launch = _bias_gelu_forward_kernel
    _backward_launch = _bias_gelu_backward_kernel
else:
    _forward_launch = triton.autotune(configs=_GPU_CONFIGS, key=["n_cols"])(
        _bias_gelu_forward_kernel)
    # Re-running a config is harmless: every output element and partial is overwritten.
    _backward_launch = triton.autotune(configs=_GPU_CONFIGS, key=["n_cols"])(
        _bias_gelu_backward_kernel)


def _interpret_meta(n_cols: int) -> dict:
    return {"BLOCK_M": _INTERPRET_BLOCK_M,
            "BLOCK_N": min(triton.next_power_of_2(n_cols), _INTERPRET_MAX_BLOCK_N)}


def _row_programs(n_rows: int, device: torch.device) -> int:
    """Row-programs per column block in the backward (fixed before the autotuner picks
    BLOCK_M, so the partial buffer's shape does not depend on the config).

    GPU: 4 per SM, enough to fill the machine (times the column blocks), while the
    ``(programs, features)`` partials stay ~2 MB at 4096 features. Interpreter: 3, so tests
    cover programs with several, one and no row tiles.
    """
    if device.type == "cuda":
        cap = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = 3
    return max(1, min(n_rows, cap))


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
def _check_inputs(x, bias) -> int:
    """Validate ``x`` and ``bias``; returns the feature count."""
    check_float_tensor("x", x)
    check_float_tensor("bias", bias)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., features), got a scalar")
    features = x.shape[-1]
    if tuple(bias.shape) != (features,):
        raise ValueError(f"bias must have shape ({features},), got {tuple(bias.shape)}")
    if bias.device != x.device:
        raise ValueError(f"x and bias must be on one device, got x on {x.device}, "
                         f"bias on {bias.device}")
    return features


def _rows(t: torch.Tensor, features: int) -> torch.Tensor:
    """``(..., features)`` -> ``(rows, features)`` with a unit column stride. The row count
    is spelled out: ``reshape(-1, 0)`` cannot infer it when ``features`` is 0."""
    t2 = t.reshape(math.prod(t.shape[:-1]), features)
    if t2.stride(-1) != 1 and features > 1:
        t2 = t2.contiguous()
    return t2


def _check_dropout(dropout_p, seed, numel: int) -> None:
    if not isinstance(dropout_p, (int, float)) or not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an int in [0, 2**63), got {seed!r}")
    if numel >= 2**31:
        raise ValueError(f"x has {numel} elements; the dropout kernel's int32 RNG counters "
                         "need fewer than 2**31")


def _forward(x: torch.Tensor, bias: torch.Tensor, dropout_p: float, seed: int) -> torch.Tensor:
    features = x.shape[-1]
    x2 = _rows(x, features)
    n_rows = x2.shape[0]
    y = _empty((n_rows, features), x.dtype, x.device)
    if y.numel() == 0:
        return y.view(x.shape)
    args = (x2, bias.contiguous(), y, n_rows, features, float(dropout_p), int(seed),
            x2.stride(0), y.stride(0))
    flags = dict(HAS_DROPOUT=dropout_p > 0.0, ACC_DTYPE=tl_accumulator_dtype(x.dtype))
    if _INTERPRET:
        meta = _interpret_meta(features)
        grid = (triton.cdiv(n_rows, meta["BLOCK_M"]), triton.cdiv(features, meta["BLOCK_N"]))
        _forward_launch[grid](*args, **flags, **meta)
    else:
        grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),  # noqa: E731
                             triton.cdiv(features, meta["BLOCK_N"]))
        _forward_launch[grid](*args, **flags)
    return y.view(x.shape)


def _check_backward(grad_output, x, needs_input_grad) -> List[bool]:
    check_grad_output(grad_output, x, "x")
    return needs_flags(needs_input_grad, ("x", "bias"))


def _backward(grad_output: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
              dropout_p: float, seed: int, need_dx: bool, need_dbias: bool
              ) -> List[torch.Tensor]:
    features = x.shape[-1]
    x2 = _rows(x, features)
    dy2 = _rows(grad_output, features)
    n_rows = x2.shape[0]
    device = x.device
    acc_torch = torch.float64 if x.dtype == torch.float64 else torch.float32
    dx = _empty((n_rows, features), x.dtype, device) if need_dx else None
    dbias_partial = None
    if n_rows == 0 or features == 0:
        if need_dbias:  # a sum over zero rows
            dbias_partial = torch.zeros((1, features), dtype=acc_torch, device=device)
    elif need_dx or need_dbias:
        programs = _row_programs(n_rows, device)
        if need_dbias:
            dbias_partial = _empty((programs, features), acc_torch, device)
        dummy = dy2  # stands in for absent pointers; constexpr-guarded, never touched
        args = (dy2, x2, bias.contiguous(),
                dx if dx is not None else dummy,
                dbias_partial if dbias_partial is not None else dummy,
                n_rows, features, float(dropout_p), int(seed),
                dy2.stride(0), x2.stride(0), dx.stride(0) if dx is not None else 0, features)
        flags = dict(HAS_DROPOUT=dropout_p > 0.0, STORE_DX=need_dx, COMPUTE_DBIAS=need_dbias,
                     ACC_DTYPE=tl_accumulator_dtype(acc_torch))
        if _INTERPRET:
            meta = _interpret_meta(features)
            _backward_launch[(programs, triton.cdiv(features, meta["BLOCK_N"]))](
                *args, **flags, **meta)
        else:
            grid = lambda meta: (programs, triton.cdiv(features, meta["BLOCK_N"]))  # noqa: E731
            _backward_launch[grid](*args, **flags)
    return [
        dx.view(x.shape) if dx is not None else grad_output.new_empty(0),
        dbias_partial.sum(0).to(bias.dtype) if need_dbias else grad_output.new_empty(0),
    ]


def forward(x: torch.Tensor, bias: torch.Tensor, *, check_arguments: bool = True) -> torch.Tensor:
    """Exact ``GELU(x + bias)``.

    ``x``: ``(..., features)`` fp16/bf16/fp32/fp64; ``bias``: ``(features,)`` any float
    dtype. Returns ``x``'s shape and dtype, contiguous. ``check_arguments=False``: the caller
    (spanbert_fast.ops, at its public boundary) has checked them.
    """
    if check_arguments:
        _check_inputs(x, bias)
    return _forward(x, bias, 0.0, 0)


def backward(grad_output: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
             needs_input_grad: Sequence[bool], *, check_arguments: bool = True
             ) -> List[torch.Tensor]:
    """Gradients ``[dx, dbias]`` of :func:`forward`.

    ``grad_output``: ``x``'s shape. ``needs_input_grad``: 2 bools for (x, bias).
    ``dx``: ``x``'s shape and dtype; ``dbias``: ``(features,)`` in ``bias``'s dtype, summed
    in fp32. A 0-element tensor stands in for a gradient that is not needed.
    """
    if check_arguments:
        _check_inputs(x, bias)
        need_dx, need_dbias = _check_backward(grad_output, x, needs_input_grad)
    else:
        need_dx, need_dbias = (bool(n) for n in needs_input_grad)
    return _backward(grad_output, x, bias, 0.0, 0, need_dx, need_dbias)


def forward_with_dropout(x: torch.Tensor, bias: torch.Tensor, dropout_p: float,
                         seed: int) -> torch.Tensor:
    """``dropout(GELU(x + bias), dropout_p)``: kept elements scaled by ``1 / (1 - p)``.

    As :func:`forward`, plus ``dropout_p`` in ``[0, 1)`` and ``seed``, an int in
    ``[0, 2**63)`` that :func:`backward_with_dropout` must receive again. ``x`` must have
    fewer than 2**31 elements. ``dropout_p == 0`` gives :func:`forward`'s result.
    """
    _check_inputs(x, bias)
    _check_dropout(dropout_p, seed, x.numel())
    return _forward(x, bias, float(dropout_p), seed)


def backward_with_dropout(grad_output: torch.Tensor, x: torch.Tensor, bias: torch.Tensor,
                          dropout_p: float, seed: int,
                          needs_input_grad: Sequence[bool]) -> List[torch.Tensor]:
    """Gradients ``[dx, dbias]`` of :func:`forward_with_dropout` with the same
    ``dropout_p`` and ``seed`` (the keep mask is regenerated, not stored)."""
    _check_inputs(x, bias)
    _check_dropout(dropout_p, seed, x.numel())
    need_dx, need_dbias = _check_backward(grad_output, x, needs_input_grad)
    return _backward(grad_output, x, bias, float(dropout_p), seed, need_dx, need_dbias)


def not_supported_reasons(tensors: Sequence[torch.Tensor]) -> List[str]:
    """Every float input the public op accepts runs here (the rows are walked in blocks):
    no reason."""
    return []
