"""Fused residual-add + LayerNorm over the last dimension, forward and backward, in Triton.

``y = LayerNorm(x + residual) * weight + bias`` with the statistics (mean, variance) taken
in fp32 whatever the input dtype (fp64 for fp64 inputs), as
:func:`spanbert_fast.ops.reference.layer_norm` does. One program normalises one row held
entirely in registers (``BLOCK_N = next_power_of_2(hidden)``), so a row is read once and
written once: SpanBERT's hidden sizes are 768 (base) and 1024 (large), 200 in the SBO head.

The forward kernel also writes each row's mean and rstd (``1 / sqrt(var + eps)``) in the
accumulator dtype: 8 bytes per row (16 for fp64), next to the row's ``2 x hidden`` bytes of
fp16 output. The backward kernel reads them and runs no statistics reduction. It rebuilds
``x_hat = (x + residual - mean) * rstd`` from the inputs: the residual sum is one
elementwise add of two rows the backward loads anyway, cheaper than writing the sum in the
forward and holding another ``rows x hidden`` tensor until the backward.

``dweight``/``dbias`` are column sums over all rows. Each backward program walks a
contiguous run of rows, accumulates its share in fp32 registers and writes one row of a
``(programs, hidden)`` fp32 partial buffer; ``torch.sum`` over the programs finishes the
reduction. No atomics: the result is deterministic run to run, and the partial buffer is
small (``2 x SMs x hidden`` floats, ~1 MB for 132 SMs at 1024) next to the ``rows x
hidden`` gradient itself.

Entry points (``spanbert_fast.ops.layer_norm`` calls the first two from its custom ops;
they keep only cheap layout asserts, the arguments were checked at the public op):

* :func:`layer_norm_forward` ``(x, weight, bias, eps, residual) -> (y, mean, rstd)``
* :func:`layer_norm_backward` ``(grad_output, x, weight, bias, residual, mean, rstd,
  needs_input_grad) -> [dx, dweight, dbias, dresidual]``
* :func:`forward` / :func:`backward`: the same with full argument checks, for callers that
  hold no statistics (the kernel tests); ``backward`` runs the forward kernel for
  them first.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import (accumulator_dtype, backward_programs, check_float_tensor,
                      check_grad_output, empty_buffer, layer_norm_row, layer_norm_row_backward,
                      needs_flags, row_num_warps, tl_accumulator_dtype)

__all__ = ["layer_norm_forward", "layer_norm_backward", "forward", "backward",
           "MAX_FUSED_BYTES", "not_supported_reasons"]


# A row lives in registers in the accumulator dtype; past 64 KB per row (16384 elements,
# 8192 for fp64) the register file spills and a looped kernel would be needed. SpanBERT
# needs 1024.
MAX_FUSED_BYTES = 65536

# Testing hook: when True, every buffer the launchers allocate (outputs and dweight/dbias
# partials) is filled with NaN first, so an element a kernel fails to write shows up as
# NaN in the result. Tests switch it on with monkeypatch; it costs a fill per buffer.
POISON_BUFFERS = False


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return empty_buffer(shape, dtype, device, POISON_BUFFERS)


@triton.jit
def _layer_norm_forward_kernel(
    X, RESIDUAL, WEIGHT, BIAS, Y, MEAN, RSTD,
    n_cols, eps,
    stride_x_row, stride_residual_row, stride_y_row,
    BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """One program per row: ``Y[row] = LN(X[row] + RESIDUAL[row]) * WEIGHT + BIAS``.

    X: (rows, n_cols) fp16/bf16/fp32/fp64, unit column stride.
    RESIDUAL: (rows, n_cols) any float dtype, read only if HAS_RESIDUAL.
    WEIGHT, BIAS: (n_cols,) any float dtype, contiguous.
    Y: (rows, n_cols) X's dtype. Statistics in ACC_DTYPE (fp32, or fp64 for fp64 inputs).
    MEAN, RSTD: (rows,) ACC_DTYPE, contiguous: this row's mean and 1 / sqrt(var + eps), saved
    for the backward.
    """
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride may pass 2**31
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    h = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(ACC_DTYPE)
    if HAS_RESIDUAL:
        # Added in the accumulator dtype, not rounded back to fp16/bf16 first: one rounding
        # fewer than torch's ``x + residual`` and no extra pass over memory.
        r = tl.load(RESIDUAL + row * stride_residual_row + cols, mask=mask, other=0.0)
        h += r.to(ACC_DTYPE)
    centered, mean, rstd = layer_norm_row(h, mask, n_cols, eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    w = tl.load(WEIGHT + cols, mask=mask, other=0.0).to(ACC_DTYPE)
    b = tl.load(BIAS + cols, mask=mask, other=0.0).to(ACC_DTYPE)
    y = centered * rstd * w + b
    tl.store(Y + row * stride_y_row + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_backward_kernel(
    DY, X, RESIDUAL, WEIGHT, MEAN, RSTD, DX, DRESIDUAL, DWEIGHT_PARTIAL, DBIAS_PARTIAL,
    n_rows, n_cols, rows_per_program,
    stride_dy_row, stride_x_row, stride_residual_row, stride_dx_row, stride_dresidual_row,
    stride_partial_row,
    BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, STORE_DX: tl.constexpr,
    STORE_DRESIDUAL: tl.constexpr, COMPUTE_DWEIGHT: tl.constexpr,
    COMPUTE_DBIAS: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    """Rows ``[pid * rows_per_program, ...)`` of the LayerNorm backward.

    DY: (rows, n_cols) Y's dtype. X, RESIDUAL: as in the forward (RESIDUAL read only if
    HAS_RESIDUAL). WEIGHT: (n_cols,). MEAN, RSTD: (rows,) ACC_DTYPE, the forward's
    statistics (read, not recomputed: the only row reductions here are the two of dx).
    DX: (rows, n_cols) X's dtype, written if STORE_DX; DRESIDUAL: (rows, n_cols)
    RESIDUAL's dtype, written if STORE_DRESIDUAL (the same values: d(x + r)/dr = 1).
    DWEIGHT_PARTIAL, DBIAS_PARTIAL: (programs, n_cols) ACC_DTYPE; row ``pid`` receives this
    program's sum of ``dy * x_hat`` / ``dy`` over its rows.

        x_hat = (h - mean) * rstd,  g = dy * weight
        dx = rstd * (g - mean(g * x_hat) * x_hat - mean(g))
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    w = tl.load(WEIGHT + cols, mask=mask, other=0.0).to(ACC_DTYPE)
    dweight_acc = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    dbias_acc = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    # Rows as int64 (row * stride may pass 2**31): the first row is cast once and the loop
    # counts from 0, since a loop variable cannot be cast in the interpreter.
    first_row = pid.to(tl.int64) * rows_per_program
    rows_here = tl.minimum(rows_per_program, n_rows - pid * rows_per_program)
    for i in range(0, rows_here):
        row = first_row + i
        h = tl.load(X + row * stride_x_row + cols, mask=mask, other=0.0).to(ACC_DTYPE)
        if HAS_RESIDUAL:
            r = tl.load(RESIDUAL + row * stride_residual_row + cols, mask=mask, other=0.0)
            h += r.to(ACC_DTYPE)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        x_hat = tl.where(mask, (h - mean) * rstd, 0.0)
        dy = tl.load(DY + row * stride_dy_row + cols, mask=mask, other=0.0).to(ACC_DTYPE)
        if COMPUTE_DWEIGHT:
            dweight_acc += dy * x_hat
        if COMPUTE_DBIAS:
            dbias_acc += dy
        if STORE_DX or STORE_DRESIDUAL:
            dx = layer_norm_row_backward(dy, w, x_hat, rstd, n_cols)
            if STORE_DX:
                tl.store(DX + row * stride_dx_row + cols, dx.to(DX.dtype.element_ty),
                         mask=mask)
            if STORE_DRESIDUAL:
                tl.store(DRESIDUAL + row * stride_dresidual_row + cols,
                         dx.to(DRESIDUAL.dtype.element_ty), mask=mask)
    if COMPUTE_DWEIGHT:
        tl.store(DWEIGHT_PARTIAL + pid * stride_partial_row + cols, dweight_acc, mask=mask)
    if COMPUTE_DBIAS:
        tl.store(DBIAS_PARTIAL + pid * stride_partial_row + cols, dbias_acc, mask=mask)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
def _check_inputs(x, weight, bias, eps, residual) -> int:
    """Validate the forward's arguments (``eps`` None: the backward's, which has none);
    returns the hidden size."""
    check_float_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., hidden), got a scalar")
    hidden = x.shape[-1]
    if hidden < 1:
        raise ValueError(f"x's last dimension (hidden) must be >= 1, got shape {tuple(x.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        check_float_tensor(name, t)
        if tuple(t.shape) != (hidden,):
            raise ValueError(f"{name} must have shape ({hidden},), got {tuple(t.shape)}")
    if residual is not None:
        check_float_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, "
                             f"got {tuple(residual.shape)}")
    if eps is not None and (not isinstance(eps, (int, float)) or not float(eps) > 0.0):
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    devices = {t.device for t in (x, weight, bias, residual) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"x, weight, bias and residual must be on one device, got "
                         f"{sorted(str(d) for d in devices)}")
    row_bytes = triton.next_power_of_2(hidden) * max(x.element_size(), 4)
    if row_bytes > MAX_FUSED_BYTES:
        raise ValueError(f"x's hidden size {hidden} is too large for the fused LayerNorm "
                         f"(a row must fit in {MAX_FUSED_BYTES} bytes of registers)")
    return hidden


def _rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """``(..., hidden)`` -> ``(rows, hidden)`` with a unit column stride (copies only if
    the last dim is strided or the leading dims cannot be flattened into one stride)."""
    t2 = t.reshape(-1, hidden)
    if t2.stride(-1) != 1 and hidden > 1:
        t2 = t2.contiguous()
    return t2


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
                       residual: Optional[torch.Tensor], *, check_arguments: bool = True
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)``: ``y = LayerNorm(x + residual) * weight + bias`` over the last
    dim, and each row's statistics for :func:`layer_norm_backward`.

    ``x``: ``(..., hidden)`` fp16/bf16/fp32/fp64; ``residual``: ``x``'s shape (any float
    dtype) or None; ``weight``, ``bias``: ``(hidden,)``. ``y``: ``x``'s shape, contiguous,
    in the dtype of ``x + residual`` (type promotion; ``x``'s dtype without a residual).
    ``mean``, ``rstd`` (``1 / sqrt(var + eps)``): ``x.shape[:-1]``, fp32 (fp64 when
    ``x + residual`` is fp64). ``check_arguments=False``: the caller checked them (the
    public op does, once).
    """
    if check_arguments:
        _check_inputs(x, weight, bias, eps, residual)
    hidden = x.shape[-1]
    x2 = _rows(x, hidden)
    r2 = _rows(residual, hidden) if residual is not None else x2
    weight, bias = weight.contiguous(), bias.contiguous()
    n_rows = x2.shape[0]
    out_dtype = torch.promote_types(x.dtype, r2.dtype)
    acc = accumulator_dtype(out_dtype)
    y = _empty((n_rows, hidden), out_dtype, x.device)
    mean = _empty((n_rows,), acc, x.device)
    rstd = _empty((n_rows,), acc, x.device)
    if n_rows > 0:
        block_n = triton.next_power_of_2(hidden)
        _layer_norm_forward_kernel[(n_rows,)](
            x2, r2, weight, bias, y, mean, rstd,
            hidden, float(eps),
            x2.stride(0), r2.stride(0), y.stride(0),
            BLOCK_N=block_n, HAS_RESIDUAL=residual is not None,
            ACC_DTYPE=tl_accumulator_dtype(acc), num_warps=row_num_warps(block_n),
        )
    return y.view(x.shape), mean.view(x.shape[:-1]), rstd.view(x.shape[:-1])


def layer_norm_backward(grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                        bias: torch.Tensor, residual: Optional[torch.Tensor],
                        mean: torch.Tensor, rstd: torch.Tensor,
                        needs_input_grad: Sequence[bool], *, check_arguments: bool = True
                        ) -> List[torch.Tensor]:
    """Gradients ``[dx, dweight, dbias, dresidual]`` of :func:`layer_norm_forward`, from
    its saved ``mean`` and ``rstd`` (no statistics recomputed).

    ``grad_output``: ``x``'s shape. ``needs_input_grad``: 4 bools for (x, weight, bias,
    residual). Each gradient has its input's shape and dtype; where it is not needed, or
    ``residual`` is None, a 0-element tensor stands in. ``dx`` and ``dresidual`` hold equal
    values in separate tensors (a custom op may not return aliases). ``bias`` gives only
    the dtype of ``dbias``. ``check_arguments=False``: the caller checked them.
    """
    if check_arguments:
        _check_inputs(x, weight, bias, None, residual)
        check_grad_output(grad_output, x, "x")
        needs_input_grad = needs_flags(needs_input_grad, ("x", "weight", "bias", "residual"))
    hidden = x.shape[-1]
    need_dx, need_dweight, need_dbias, need_dresidual = (bool(n) for n in needs_input_grad)
    need_dresidual = need_dresidual and residual is not None

    x2 = _rows(x, hidden)
    r2 = _rows(residual, hidden) if residual is not None else x2
    dy2 = _rows(grad_output, hidden)
    n_rows = x2.shape[0]
    device = x.device
    acc_torch = accumulator_dtype(torch.promote_types(x.dtype, r2.dtype))
    assert mean.dtype == rstd.dtype == acc_torch and mean.numel() == rstd.numel() == n_rows

    dx = _empty((n_rows, hidden), x.dtype, device) if need_dx else None
    dres = _empty((n_rows, hidden), residual.dtype, device) if need_dresidual else None
    if n_rows == 0:
        # Sums over zero rows: exact zeros, no launch.
        dweight_partial = torch.zeros((1, hidden), dtype=acc_torch, device=device)
        dbias_partial = dweight_partial
    else:
        programs = backward_programs(n_rows, device, interpreter_programs=4)
        rows_per_program = triton.cdiv(n_rows, programs)
        programs = triton.cdiv(n_rows, rows_per_program)  # every program gets >= 1 row
        dweight_partial = (_empty((programs, hidden), acc_torch, device)
                           if need_dweight else None)
        dbias_partial = _empty((programs, hidden), acc_torch, device) if need_dbias else None
        if need_dx or need_dresidual or need_dweight or need_dbias:
            block_n = triton.next_power_of_2(hidden)
            dummy = dy2  # stands in for absent pointers; constexpr-guarded, never touched
            partial_stride = hidden
            _layer_norm_backward_kernel[(programs,)](
                dy2, x2, r2, weight.contiguous(),
                mean.reshape(-1).contiguous(), rstd.reshape(-1).contiguous(),
                dx if dx is not None else dummy, dres if dres is not None else dummy,
                dweight_partial if dweight_partial is not None else dummy,
                dbias_partial if dbias_partial is not None else dummy,
                n_rows, hidden, rows_per_program,
                dy2.stride(0), x2.stride(0), r2.stride(0),
                dx.stride(0) if dx is not None else 0,
                dres.stride(0) if dres is not None else 0,
                partial_stride,
                BLOCK_N=block_n, HAS_RESIDUAL=residual is not None, STORE_DX=need_dx,
                STORE_DRESIDUAL=need_dresidual, COMPUTE_DWEIGHT=need_dweight,
                COMPUTE_DBIAS=need_dbias, ACC_DTYPE=tl_accumulator_dtype(acc_torch),
                num_warps=row_num_warps(block_n),
            )
    # A fresh 0-element tensor per slot: the custom op's outputs must not alias each other.
    return [
        dx.view(x.shape) if dx is not None else grad_output.new_empty(0),
        dweight_partial.sum(0).to(weight.dtype) if need_dweight else grad_output.new_empty(0),
        dbias_partial.sum(0).to(bias.dtype) if need_dbias else grad_output.new_empty(0),
        dres.view(residual.shape) if dres is not None else grad_output.new_empty(0),
    ]


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
            residual: Optional[torch.Tensor]) -> torch.Tensor:
    """``y`` of :func:`layer_norm_forward`, its arguments checked first (TypeError /
    ValueError naming the argument): for callers outside ``spanbert_fast.ops``."""
    return layer_norm_forward(x, weight, bias, eps, residual)[0]


def backward(grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
             bias: torch.Tensor, eps: float, residual: Optional[torch.Tensor],
             needs_input_grad: Sequence[bool]) -> List[torch.Tensor]:
    """Gradients ``[dx, dweight, dbias, dresidual]`` of :func:`forward` for a caller that
    kept no statistics (the kernel tests): checks the arguments, runs the forward
    kernel for ``mean``/``rstd``, then :func:`layer_norm_backward`. The custom op's
    autograd never comes here: it saved the forward's statistics.

    ``grad_output``: ``x``'s shape. ``needs_input_grad``: 4 bools for (x, weight, bias,
    residual); see :func:`layer_norm_backward` for the results.
    """
    _check_inputs(x, weight, bias, eps, residual)
    check_grad_output(grad_output, x, "x")
    needs = needs_flags(needs_input_grad, ("x", "weight", "bias", "residual"))
    _, mean, rstd = layer_norm_forward(x, weight, bias, eps, residual, check_arguments=False)
    return layer_norm_backward(grad_output, x, weight, bias, residual, mean, rstd, needs,
                               check_arguments=False)


def not_supported_reasons(tensors: Sequence[torch.Tensor]) -> List[str]:
    """Why the kernel cannot take ``x`` (first of ``tensors``): a row wider than the
    registers hold (MAX_FUSED_BYTES); an empty list when it can."""
    if not tensors or not tensors[0].is_floating_point() or tensors[0].dim() < 1:
        return []
    x = tensors[0]
    hidden = x.shape[-1]
    if triton.next_power_of_2(max(hidden, 1)) * max(x.element_size(), 4) > MAX_FUSED_BYTES:
        return [f"the fused LayerNorm holds a row in registers: hidden size {hidden} is over "
                f"its {MAX_FUSED_BYTES // 4} fp32 elements"]
    return []
