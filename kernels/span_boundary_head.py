"""SpanBERT's span-boundary head (the SBO MLP) on cuBLAS GEMMs plus one fused Triton
epilogue, forward and backward.

``y = LN2(GELU(W2 · LN1(GELU(W1 · [h[left]; h[right]; p[rel]] + b1)) + b2))`` per target,
the op of :func:`spanbert_fast.ops.reference.span_boundary_head`. Shapes: ``hidden`` (T, H)
flattened encoder rows, ``left_index``/``right_index``/``rel_pos`` (N,) int64,
``position_table`` (P, E) (15 x 200 in the release), ``w1`` (H, 2H + E), ``w2`` (H, H).

How the first layer avoids the (N x (2H + E)) concatenation
-----------------------------------------------------------
``W1 · [h_l; h_r; p] = [W1a | W1b] · [h_l; h_r] + W1c · p`` with ``W1a|W1b = w1[:, :2H]`` and
``W1c = w1[:, 2H:]`` (column views of ``w1``, no copy: cuBLAS reads them with a leading
dimension of 2H + E).

* ``[h_l; h_r]``: one ``index_select`` of the interleaved indices ``(l0, r0, l1, r1, ...)``
  gives a (2N, H) tensor whose memory *is* the (N, 2H) row-concatenation, so one GEMM with
  K = 2H (one rounding in fp16/bf16, like the reference's single GEMM) covers both
  boundaries. That gather is the only copy of hidden rows; the position features are
  never gathered.
* ``W1c · p``: projected once for the P table rows, ``(P, H) = table @ W1c^T`` (P = 15 is
  far below N, the number of targets), and the epilogue kernel adds row ``rel[n]`` of that
  projection while it loads row n of the GEMM output: the (N, E) position features and
  their (N, H) projection never exist.

The epilogue :func:`bias_gelu_layer_norm_forward` (one program per row: ``z + table[index]
+ bias`` -> exact erf GELU -> LayerNorm with fp32 statistics) serves both layers, so each
layer is one GEMM plus one kernel that reads its input once and writes its output once.

Backward: nothing of the forward runs again. The forward saves (see
:data:`SAVED_FOR_BACKWARD`) the gathered boundary rows, both GEMM outputs ``z1`` and ``z2``
(before bias and GELU), the position projection, the first layer's output ``y1`` and both
LayerNorms' per-row mean and rstd, which the epilogue kernel writes while it normalises a
row (8 bytes per row, 16 for fp64). Memory held until the backward: ``N x 5H`` elements
plus the (P, H) projection, ~25 MB at pretraining's ~2.5k targets, H = 1024, fp16.
For each layer the backward epilogue kernel rebuilds the pre-activation and GELU
elementwise from ``z`` (plus bias and the projection row), reads the saved statistics and
gives ``dz`` (the gradient at the GEMM output) and fp32 column sums for the bias and the two
LayerNorm parameters. The GEMMs are the gradients' own, on cuBLAS: per linear layer
d input and d weight (``dW2 = dz2^T y1``, ``dy1 = dz2 W2``, ``dW1ab = dz1^T gathered``,
``d gathered = dz1 W1ab``), and three small ones on the P table rows: ``d(table @ W1c^T)``
is a (P, H) sum of ``dz1`` rows by ``rel``, computed as the GEMM ``onehot(rel)^T @ dz1``
(deterministic, fp32 accumulation inside cuBLAS, P x N x H flops: negligible), then
``dW1c = dproj^T @ table`` and ``dtable = dproj @ W1c``. The hidden gradient is scattered
with one ``index_add_`` of the (N, 2H) gathered-row gradient, viewed as (2N, H), into
fp32 zeros: atomic on CUDA, so two targets sharing a boundary row accumulate, in a
run-to-run order that is not fixed. Whether sorting the indices and reducing segments
beats the atomics at SpanBERT's ~8 targets per boundary row is still to be measured on a
GPU.

erf: ``tl.math.erf`` is a core op on triton 3.6 and 3.7.1; the interpreter evaluates it
with Python's ``math.erf`` and NVIDIA GPUs lower it to libdevice's ``erff`` (see
``kernels/bias_gelu.py``, whose authors measured the interpreter's accuracy). ``bias_gelu.py`` keeps
its GELU helpers private, so this file has its own two-line copies of the formula.

Entry points (``spanbert_fast.ops.span_boundary_head`` calls the first two from its custom
ops; they keep only cheap layout asserts, the arguments were checked at the public op):

* :func:`span_boundary_head_forward` ``(hidden, left_index, right_index, rel_pos,
  position_table, w1, b1, ln1_weight, ln1_bias, w2, b2, ln2_weight, ln2_bias, eps)
  -> (out (N, H), *saved)``
* :func:`span_boundary_head_backward` ``(grad_output, <the 13 tensor args>, *saved,
  needs_input_grad) -> 13 tensors``
* :func:`forward` ``(<the 13 tensor args>, eps) -> (N, H)`` / :func:`backward`
  ``(grad_output, <the 13 tensor args>, eps, needs_input_grad) -> 13 tensors``: the same
  with full argument checks, for callers that hold nothing from the forward (tests);
  ``backward`` runs the forward for them first.
* :func:`bias_gelu_layer_norm_forward` / :func:`bias_gelu_layer_norm_backward`: the
  epilogue alone (the backward computes its statistics with the forward kernel first).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import (accumulator_dtype, backward_programs, check_float_tensor, empty_buffer,
                      gelu_erf, gelu_erf_derivative, layer_norm_row, layer_norm_row_backward,
                      needs_flags, row_num_warps, tl_accumulator_dtype, value_checks_enabled)

__all__ = [
    "span_boundary_head_forward",
    "span_boundary_head_backward",
    "forward",
    "backward",
    "not_supported_reasons",
    "bias_gelu_layer_norm_forward",
    "bias_gelu_layer_norm_backward",
    "TENSOR_ARGUMENTS",
    "SAVED_FOR_BACKWARD",
]


# The op's tensor arguments in order: backward returns one gradient per name.
TENSOR_ARGUMENTS = ("hidden", "left_index", "right_index", "rel_pos", "position_table",
                    "w1", "b1", "ln1_weight", "ln1_bias", "w2", "b2", "ln2_weight",
                    "ln2_bias")

# What span_boundary_head_forward returns after the output, in order, for the backward:
# the gathered boundary rows (N, 2H), the first GEMM's output z1 (N, H), the position
# table's projection (P, H), the first layer's output y1 (N, H), the second GEMM's output
# z2 (N, H), and each LayerNorm's per-row mean and rstd (N,) in the accumulator dtype.
SAVED_FOR_BACKWARD = ("gathered", "z1", "projection", "y1", "z2", "mean1", "rstd1", "mean2",
                      "rstd2")

# A row lives in registers (BLOCK_N = next_power_of_2(H)); SpanBERT needs 768 or 1024.
# Past 16384 fp32 elements per row the register file would spill.
_MAX_BLOCK_N = 16384


# Testing hook: when True, every buffer the launchers allocate for a kernel to fill
# (epilogue outputs, dz, column-sum partials, weight gradients assembled by slices) is
# filled with NaN first, so an element left unwritten shows up as NaN. Tests switch it on
# with monkeypatch; it costs a fill per buffer.
POISON_BUFFERS = False


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return empty_buffer(shape, dtype, device, POISON_BUFFERS)


@triton.jit
def _pre_activation(Z, TABLE, TABLE_INDEX, bias, row, cols, mask, stride_z_row,
                    stride_table_row, HAS_TABLE: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """``Z[row] + TABLE[TABLE_INDEX[row]] + bias`` in ACC_DTYPE (zeros on masked lanes)."""
    z = tl.load(Z + row * stride_z_row + cols, mask=mask, other=0.0).to(ACC_DTYPE)
    if HAS_TABLE:
        table_row = tl.load(TABLE_INDEX + row)
        z += tl.load(TABLE + table_row * stride_table_row + cols, mask=mask,
                     other=0.0).to(ACC_DTYPE)
    return z + bias


@triton.jit
def _bias_gelu_layer_norm_forward_kernel(
    Z, TABLE, TABLE_INDEX, BIAS, LN_WEIGHT, LN_BIAS, OUT, MEAN, RSTD,
    n_cols, eps,
    stride_z_row, stride_table_row, stride_out_row,
    HAS_TABLE: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One program per row: ``OUT[r] = LN(GELU(Z[r] + TABLE[TABLE_INDEX[r]] + BIAS))``.

    Z: (rows, n_cols) fp16/bf16/fp32/fp64, unit column stride (a GEMM output).
    TABLE: (P, n_cols) Z's dtype, unit column stride, and TABLE_INDEX: (rows,) int64 in
    [0, P), read only if HAS_TABLE. BIAS, LN_WEIGHT, LN_BIAS: (n_cols,) any float dtype,
    contiguous. OUT: (rows, n_cols) Z's dtype. Math and statistics in ACC_DTYPE.
    MEAN, RSTD: (rows,) ACC_DTYPE, contiguous: the LayerNorm's mean and 1 / sqrt(var + eps)
    of GELU(...) per row, saved for the backward.
    """
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2**31
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    bias = tl.load(BIAS + cols, mask=mask, other=0.0).to(ACC_DTYPE)
    z = _pre_activation(Z, TABLE, TABLE_INDEX, bias, row, cols, mask, stride_z_row,
                        stride_table_row, HAS_TABLE, ACC_DTYPE)
    a = gelu_erf(z)  # GELU(0) = 0 on masked lanes
    centered, mean, rstd = layer_norm_row(a, mask, n_cols, eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    w = tl.load(LN_WEIGHT + cols, mask=mask, other=0.0).to(ACC_DTYPE)
    b = tl.load(LN_BIAS + cols, mask=mask, other=0.0).to(ACC_DTYPE)
    tl.store(OUT + row * stride_out_row + cols, (centered * rstd * w + b).to(
        OUT.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_layer_norm_backward_kernel(
    DY, Z, TABLE, TABLE_INDEX, BIAS, LN_WEIGHT, MEAN, RSTD,
    DZ, DBIAS_PARTIAL, DLN_WEIGHT_PARTIAL, DLN_BIAS_PARTIAL,
    n_rows, n_cols, rows_per_program,
    stride_dy_row, stride_z_row, stride_table_row, stride_dz_row, stride_partial_row,
    HAS_TABLE: tl.constexpr, STORE_DZ: tl.constexpr, COMPUTE_DBIAS: tl.constexpr,
    COMPUTE_DLN_WEIGHT: tl.constexpr, COMPUTE_DLN_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Rows ``[pid * rows_per_program, ...)`` of the epilogue's backward.

    DY: (rows, n_cols) OUT's dtype. Z, TABLE, TABLE_INDEX, BIAS, LN_WEIGHT: as in the
    forward; the pre-activation and GELU are rebuilt elementwise from them. MEAN, RSTD:
    (rows,) ACC_DTYPE, the forward's LayerNorm statistics (read, not recomputed).
    DZ: (rows, n_cols) Z's dtype, written if STORE_DZ: the gradient at Z (= at the
    pre-activation, = at the table row, = at the bias).
    DBIAS_PARTIAL, DLN_WEIGHT_PARTIAL, DLN_BIAS_PARTIAL: (programs, n_cols) ACC_DTYPE;
    row ``pid`` receives this program's column sums of dz, dy * a_hat and dy.

        a = GELU(z), a_hat = (a - mean) * rstd, g = dy * ln_weight
        da = rstd * (g - mean(g * a_hat) * a_hat - mean(g)),  dz = da * GELU'(z)
    """
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    bias = tl.load(BIAS + cols, mask=mask, other=0.0).to(ACC_DTYPE)
    w = tl.load(LN_WEIGHT + cols, mask=mask, other=0.0).to(ACC_DTYPE)
    dbias_acc = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    dln_weight_acc = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    dln_bias_acc = tl.zeros([BLOCK_N], dtype=ACC_DTYPE)
    # The first row is cast to int64 once and the loop counts from 0 (a loop variable
    # cannot be cast in the interpreter).
    first_row = pid.to(tl.int64) * rows_per_program
    rows_here = tl.minimum(rows_per_program, n_rows - pid * rows_per_program)
    for i in range(0, rows_here):
        row = first_row + i
        z = _pre_activation(Z, TABLE, TABLE_INDEX, bias, row, cols, mask, stride_z_row,
                            stride_table_row, HAS_TABLE, ACC_DTYPE)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        a_hat = tl.where(mask, (gelu_erf(z) - mean) * rstd, 0.0)
        dy = tl.load(DY + row * stride_dy_row + cols, mask=mask, other=0.0).to(ACC_DTYPE)
        if COMPUTE_DLN_WEIGHT:
            dln_weight_acc += dy * a_hat
        if COMPUTE_DLN_BIAS:
            dln_bias_acc += dy
        if STORE_DZ or COMPUTE_DBIAS:
            da = layer_norm_row_backward(dy, w, a_hat, rstd, n_cols)
            dz = tl.where(mask, da * gelu_erf_derivative(z), 0.0)
            if STORE_DZ:
                tl.store(DZ + row * stride_dz_row + cols, dz.to(DZ.dtype.element_ty),
                         mask=mask)
            if COMPUTE_DBIAS:
                dbias_acc += dz  # summed before rounding to Z's dtype
    if COMPUTE_DBIAS:
        tl.store(DBIAS_PARTIAL + pid * stride_partial_row + cols, dbias_acc, mask=mask)
    if COMPUTE_DLN_WEIGHT:
        tl.store(DLN_WEIGHT_PARTIAL + pid * stride_partial_row + cols, dln_weight_acc,
                 mask=mask)
    if COMPUTE_DLN_BIAS:
        tl.store(DLN_BIAS_PARTIAL + pid * stride_partial_row + cols, dln_bias_acc,
                 mask=mask)


# --------------------------------------------------------------------------------------
# Epilogue launchers
# --------------------------------------------------------------------------------------
def _check_epilogue_inputs(z, bias, ln_weight, eps, table, table_index) -> int:
    """Validate the epilogue's arguments; returns the width."""
    check_float_tensor("z", z, ndim=2)
    width = z.shape[1]
    if width < 1:
        raise ValueError(f"z must have at least one column, got shape {tuple(z.shape)}")
    if triton.next_power_of_2(width) > _MAX_BLOCK_N:
        raise ValueError(f"z's width {width} is too large for the fused epilogue (a row must "
                         f"fit {_MAX_BLOCK_N} elements of registers)")
    for name, t in (("bias", bias), ("ln_weight", ln_weight)):
        check_float_tensor(name, t)
        if tuple(t.shape) != (width,):
            raise ValueError(f"{name} must have shape ({width},), got {tuple(t.shape)}")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                            or not float(eps) > 0.0):
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    if (table is None) != (table_index is None):
        raise ValueError("table and table_index must be given together")
    if table is not None:
        check_float_tensor("table", table, ndim=2)
        if table.shape[1] != width or table.dtype != z.dtype:
            raise ValueError(f"table must be (P, {width}) {z.dtype}, got "
                             f"{tuple(table.shape)} {table.dtype}")
        if table_index.dtype != torch.int64 or tuple(table_index.shape) != (z.shape[0],):
            raise ValueError(f"table_index must be int64 of shape ({z.shape[0]},), got "
                             f"{table_index.dtype} {tuple(table_index.shape)}")
    devices = {t.device for t in (z, bias, ln_weight, table, table_index) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"the epilogue's tensors must be on one device, got "
                         f"{sorted(str(d) for d in devices)}")
    return width


def _unit_column_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _epilogue_forward(z: torch.Tensor, bias: torch.Tensor, ln_weight: torch.Tensor,
                      ln_bias: torch.Tensor, eps: float, table: Optional[torch.Tensor],
                      table_index: Optional[torch.Tensor]
                      ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`bias_gelu_layer_norm_forward` without the argument checks, returning
    ``(out, mean, rstd)``: ``mean``, ``rstd`` ``(rows,)`` in the accumulator dtype."""
    z = _unit_column_stride(z)
    n_rows, width = z.shape
    acc = accumulator_dtype(z.dtype)
    out = _empty((n_rows, width), z.dtype, z.device)
    mean = _empty((n_rows,), acc, z.device)
    rstd = _empty((n_rows,), acc, z.device)
    if n_rows == 0:
        return out, mean, rstd
    has_table = table is not None
    table = _unit_column_stride(table) if has_table else z
    block_n = triton.next_power_of_2(width)
    _bias_gelu_layer_norm_forward_kernel[(n_rows,)](
        z, table, table_index.contiguous() if has_table else z, bias.contiguous(),
        ln_weight.contiguous(), ln_bias.contiguous(), out, mean, rstd,
        width, float(eps),
        z.stride(0), table.stride(0), out.stride(0),
        HAS_TABLE=has_table, ACC_DTYPE=tl_accumulator_dtype(z.dtype), BLOCK_N=block_n,
        num_warps=row_num_warps(block_n),
    )
    return out, mean, rstd


def _epilogue_backward(
    dy: torch.Tensor, z: torch.Tensor, bias: torch.Tensor, ln_weight: torch.Tensor,
    mean: torch.Tensor, rstd: torch.Tensor, table: Optional[torch.Tensor],
    table_index: Optional[torch.Tensor], needs: Sequence[bool],
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor],
           Optional[torch.Tensor]]:
    """:func:`bias_gelu_layer_norm_backward` from the forward's saved ``mean``/``rstd``
    (no statistics recomputed), without the argument checks."""
    need_dz, need_dbias, need_dln_weight, need_dln_bias = (bool(n) for n in needs)
    z = _unit_column_stride(z)
    dy = _unit_column_stride(dy)
    n_rows, width = z.shape
    device = z.device
    acc = accumulator_dtype(z.dtype)
    assert mean.dtype == rstd.dtype == acc and mean.shape == rstd.shape == (n_rows,)
    dz = _empty((n_rows, width), z.dtype, device) if need_dz else None
    partials: List[Optional[torch.Tensor]] = [None, None, None]
    wanted = (need_dbias, need_dln_weight, need_dln_bias)
    if n_rows == 0:
        # Column sums over zero rows: exact zeros, no launch.
        partials = [torch.zeros((1, width), dtype=acc, device=device) if w else None
                    for w in wanted]
    elif need_dz or any(wanted):
        programs = backward_programs(n_rows, device, interpreter_programs=3)
        rows_per_program = triton.cdiv(n_rows, programs)
        programs = triton.cdiv(n_rows, rows_per_program)  # every program gets >= 1 row
        partials = [_empty((programs, width), acc, device) if w else None for w in wanted]
        has_table = table is not None
        table = _unit_column_stride(table) if has_table else z
        dummy = z  # stands in for absent pointers; constexpr-guarded, never touched
        block_n = triton.next_power_of_2(width)
        _bias_gelu_layer_norm_backward_kernel[(programs,)](
            dy, z, table, table_index.contiguous() if has_table else dummy, bias.contiguous(),
            ln_weight.contiguous(), mean.contiguous(), rstd.contiguous(),
            dz if dz is not None else dummy,
            *[p if p is not None else dummy for p in partials],
            n_rows, width, rows_per_program,
            dy.stride(0), z.stride(0), table.stride(0),
            dz.stride(0) if dz is not None else 0, width,
            HAS_TABLE=has_table, STORE_DZ=need_dz, COMPUTE_DBIAS=need_dbias,
            COMPUTE_DLN_WEIGHT=need_dln_weight, COMPUTE_DLN_BIAS=need_dln_bias,
            ACC_DTYPE=tl_accumulator_dtype(z.dtype), BLOCK_N=block_n,
            num_warps=row_num_warps(block_n),
        )
    dbias, dln_weight, dln_bias = (
        p.sum(0).to(dtype) if p is not None else None
        for p, dtype in zip(partials, (bias.dtype, ln_weight.dtype, ln_weight.dtype)))
    return dz, dbias, dln_weight, dln_bias


def bias_gelu_layer_norm_forward(
    z: torch.Tensor, bias: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor,
    eps: float, table: Optional[torch.Tensor] = None,
    table_index: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``LayerNorm(GELU(z + table[table_index] + bias)) * ln_weight + ln_bias`` per row.

    ``z``: ``(rows, width)`` fp16/bf16/fp32/fp64; ``table``: ``(P, width)`` of z's dtype
    and ``table_index``: ``(rows,)`` int64 in ``[0, P)`` (unchecked here: the caller
    validated it), or both None; ``bias``, ``ln_weight``, ``ln_bias``: ``(width,)`` any
    float dtype. Returns ``(rows, width)`` in z's dtype; math in fp32 (fp64 for fp64).
    """
    width = _check_epilogue_inputs(z, bias, ln_weight, eps, table, table_index)
    check_float_tensor("ln_bias", ln_bias)
    if tuple(ln_bias.shape) != (width,):
        raise ValueError(f"ln_bias must have shape ({width},), got {tuple(ln_bias.shape)}")
    return _epilogue_forward(z, bias, ln_weight, ln_bias, eps, table, table_index)[0]


def bias_gelu_layer_norm_backward(
    grad_output: torch.Tensor, z: torch.Tensor, bias: torch.Tensor, ln_weight: torch.Tensor,
    eps: float, table: Optional[torch.Tensor] = None,
    table_index: Optional[torch.Tensor] = None,
    needs: Sequence[bool] = (True, True, True, True),
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor],
           Optional[torch.Tensor]]:
    """Gradients ``(dz, dbias, dln_weight, dln_bias)`` of :func:`bias_gelu_layer_norm_forward`,
    for a caller that kept no statistics (tests, the compile audit): runs the forward kernel
    for them first (the head's backward reads the ones its forward saved).

    ``grad_output``: ``(rows, width)``. ``needs``: 4 bools for those four results; a
    result not needed is None. ``dz`` (also the gradient of the table row and the
    pre-activation) is in z's dtype; the three column sums are accumulated in fp32 (fp64
    for fp64) and returned in the dtypes of bias, ln_weight and ln_weight.
    """
    _check_epilogue_inputs(z, bias, ln_weight, eps, table, table_index)
    check_float_tensor("grad_output", grad_output, ndim=2)
    if grad_output.shape != z.shape:
        raise ValueError(f"grad_output must have z's shape {tuple(z.shape)}, "
                         f"got {tuple(grad_output.shape)}")
    # ln_bias does not change the statistics: ln_weight's values stand in for it.
    _, mean, rstd = _epilogue_forward(z, bias, ln_weight, ln_weight, eps, table, table_index)
    return _epilogue_backward(grad_output, z, bias, ln_weight, mean, rstd, table,
                              table_index, needs)


# --------------------------------------------------------------------------------------
# The head: validation, forward, backward
# --------------------------------------------------------------------------------------
def _check_head_inputs(hidden, left_index, right_index, rel_pos, position_table, w1, b1,
                       ln1_weight, ln1_bias, w2, b2, ln2_weight, ln2_bias, eps,
                       values: bool = True) -> None:
    """Shapes, dtypes, devices and, if ``values``, index ranges (one host sync for the
    three ranges; the backward passes False: its forward checked the same indices)."""
    check_float_tensor("hidden", hidden, ndim=2)
    tokens, width = hidden.shape
    for name, t in (("left_index", left_index), ("right_index", right_index),
                    ("rel_pos", rel_pos)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.int64 or t.dim() != 1:
            raise TypeError(f"{name} must be a 1-D int64 tensor, got {t.dtype} of shape "
                            f"{tuple(t.shape)}")
    n = left_index.shape[0]
    for name, t in (("right_index", right_index), ("rel_pos", rel_pos)):
        if t.shape[0] != n:
            raise ValueError(f"{name} must have shape ({n},) like left_index, "
                             f"got {tuple(t.shape)}")
    check_float_tensor("position_table", position_table, ndim=2)
    rows, pos_width = position_table.shape
    check_float_tensor("w1", w1, ndim=2)
    if tuple(w1.shape) != (width, 2 * width + pos_width):
        raise ValueError(f"w1 must have shape ({width}, {2 * width + pos_width}) = (H, 2H + E), "
                         f"got {tuple(w1.shape)}")
    check_float_tensor("w2", w2, ndim=2)
    if tuple(w2.shape) != (width, width):
        raise ValueError(f"w2 must have shape ({width}, {width}), got {tuple(w2.shape)}")
    for name, t in (("position_table", position_table), ("w1", w1), ("w2", w2)):
        if t.dtype != hidden.dtype and not _autocast_layout(hidden.dtype, t.dtype):
            raise TypeError(f"{name} must have hidden's dtype {hidden.dtype} (the GEMMs run "
                            f"in one dtype), or be float32 with float16/bfloat16 hidden "
                            f"(autocast's fp32 parameters), got {t.dtype}")
    for name, t in (("b1", b1), ("ln1_weight", ln1_weight), ("ln1_bias", ln1_bias),
                    ("b2", b2), ("ln2_weight", ln2_weight), ("ln2_bias", ln2_bias)):
        check_float_tensor(name, t)
        if tuple(t.shape) != (width,):
            raise ValueError(f"{name} must have shape ({width},), got {tuple(t.shape)}")
    if triton.next_power_of_2(max(width, 1)) > _MAX_BLOCK_N:
        raise ValueError(f"hidden's width {width} is too large for the fused epilogue")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                            or not float(eps) > 0.0):
        raise ValueError(f"eps must be a float > 0, got {eps!r}")
    tensors = dict(hidden=hidden, left_index=left_index, right_index=right_index,
                   rel_pos=rel_pos, position_table=position_table, w1=w1, b1=b1,
                   ln1_weight=ln1_weight, ln1_bias=ln1_bias, w2=w2, b2=b2,
                   ln2_weight=ln2_weight, ln2_bias=ln2_bias)
    if len({t.device for t in tensors.values()}) > 1:
        listing = ", ".join(f"{k} on {t.device}" for k, t in tensors.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    if n == 0 or not values or not value_checks_enabled():
        return
    # An index out of range would read out of bounds in index_select or the kernel (a
    # device-side assert on CUDA): refuse it here with the offending range (unless the
    # caller checked them already: see _common.skip_value_checks).
    lows = torch.stack([left_index.min(), right_index.min(), rel_pos.min()])
    highs = torch.stack([left_index.max(), right_index.max(), rel_pos.max()])
    (l_lo, r_lo, p_lo), (l_hi, r_hi, p_hi) = torch.stack([lows, highs]).tolist()
    for name, lo, hi, bound in (("left_index", l_lo, l_hi, tokens),
                                ("right_index", r_lo, r_hi, tokens),
                                ("rel_pos", p_lo, p_hi, rows)):
        if lo < 0 or hi >= bound:
            raise ValueError(f"{name} values must lie in [0, {bound}), got min {lo}, max {hi}")


def _autocast_layout(hidden_dtype: torch.dtype, param_dtype: torch.dtype) -> bool:
    """fp16/bf16 encoder rows with fp32 parameters: what the model hands the op under
    ``torch.autocast``, which never casts the arguments of a custom op."""
    return hidden_dtype in (torch.float16, torch.bfloat16) and param_dtype == torch.float32


def _gemm_operands(hidden, position_table, w1, w2):
    """position_table, w1, w2 in hidden's dtype, the one dtype the GEMMs run in (a cast
    copy only in autocast's layout, as autocast's ``F.linear`` would make; the gradients
    are cast back to each parameter's dtype)."""
    return tuple(t.to(hidden.dtype) for t in (position_table, w1, w2))


def _boundary_rows(left_index: torch.Tensor, right_index: torch.Tensor) -> torch.Tensor:
    """(2N,) interleaved ``l0, r0, l1, r1, ...``: gathering hidden with it gives a (2N, H)
    tensor whose memory is the (N, 2H) concatenation ``[h[left] | h[right]]``."""
    return torch.stack([left_index, right_index], dim=1).reshape(-1)


def _first_layer(hidden, boundary_rows, position_table, w1):
    """(gathered (N, 2H), z1 = gathered @ W1ab^T (N, H), position projection (P, H))."""
    width = hidden.shape[1]
    gathered = hidden.index_select(0, boundary_rows).view(-1, 2 * width)
    z1 = torch.mm(gathered, w1[:, : 2 * width].t())
    position_projection = torch.mm(position_table, w1[:, 2 * width:].t())
    return gathered, z1, position_projection


def span_boundary_head_forward(
    hidden: torch.Tensor, left_index: torch.Tensor, right_index: torch.Tensor,
    rel_pos: torch.Tensor, position_table: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
    ln1_weight: torch.Tensor, ln1_bias: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
    ln2_weight: torch.Tensor, ln2_bias: torch.Tensor, eps: float, *,
    check_arguments: bool = True,
) -> Tuple[torch.Tensor, ...]:
    """The SBO MLP and what its backward needs: ``(out, *saved)``, ``saved`` named by
    :data:`SAVED_FOR_BACKWARD`.

    ``hidden``: ``(T, H)`` fp16/bf16/fp32/fp64; ``left_index``, ``right_index``: ``(N,)``
    int64 rows of hidden; ``rel_pos``: ``(N,)`` int64 rows of ``position_table`` ``(P, E)``;
    ``w1``: ``(H, 2H + E)``, ``w2``: ``(H, H)`` (position_table, w1 and w2 in hidden's
    dtype, or fp32 with fp16/bf16 hidden: autocast's layout, the GEMMs then run in
    hidden's dtype); ``b1``, ``b2`` and the LayerNorm parameters: ``(H,)`` any float dtype.
    ``check_arguments=False``: the caller checked them (the public op does, once); else
    they are checked here, index ranges too unless the caller checked those
    (``skip_value_checks``).

    ``out`` ``(N, H)``, and ``gathered`` ``(N, 2H)``, ``z1`` ``(N, H)``, ``projection``
    ``(P, H)``, ``y1`` ``(N, H)``, ``z2`` ``(N, H)``, all in hidden's dtype; ``mean1``,
    ``rstd1``, ``mean2``, ``rstd2`` ``(N,)`` fp32 (fp64 for fp64).
    """
    if check_arguments:
        _check_head_inputs(hidden, left_index, right_index, rel_pos, position_table, w1, b1,
                           ln1_weight, ln1_bias, w2, b2, ln2_weight, ln2_bias, eps)
    with torch.no_grad():
        position_table, w1, w2 = _gemm_operands(hidden, position_table, w1, w2)
        gathered, z1, projection = _first_layer(
            hidden, _boundary_rows(left_index, right_index), position_table, w1)
        y1, mean1, rstd1 = _epilogue_forward(z1, b1, ln1_weight, ln1_bias, eps, projection,
                                             rel_pos)
        z2 = torch.mm(y1, w2.t())
        out, mean2, rstd2 = _epilogue_forward(z2, b2, ln2_weight, ln2_bias, eps, None, None)
    return out, gathered, z1, projection, y1, z2, mean1, rstd1, mean2, rstd2


def span_boundary_head_backward(
    grad_output: torch.Tensor, hidden: torch.Tensor, left_index: torch.Tensor,
    right_index: torch.Tensor, rel_pos: torch.Tensor, position_table: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor, ln1_weight: torch.Tensor, ln1_bias: torch.Tensor,
    w2: torch.Tensor, b2: torch.Tensor, ln2_weight: torch.Tensor, ln2_bias: torch.Tensor,
    gathered: torch.Tensor, z1: torch.Tensor, projection: torch.Tensor, y1: torch.Tensor,
    z2: torch.Tensor, mean1: torch.Tensor, rstd1: torch.Tensor, mean2: torch.Tensor,
    rstd2: torch.Tensor, needs_input_grad: Sequence[bool], *, check_arguments: bool = True,
) -> List[torch.Tensor]:
    """Gradients of :func:`span_boundary_head_forward` from its saved tensors: no forward
    GEMM, gather or statistics reduction runs again. One gradient per tensor argument
    (:data:`TENSOR_ARGUMENTS` order), each in its input's shape and dtype; a 0-element
    tensor where no gradient is needed, and always for the three integer index tensors.

    ``grad_output``: ``(N, H)``. ``needs_input_grad``: 13 bools in the same order.
    ``check_arguments=False``: the caller checked them (the forward's arguments, here
    without their index ranges, which the forward checked).
    """
    if check_arguments:
        _check_head_inputs(hidden, left_index, right_index, rel_pos, position_table, w1, b1,
                           ln1_weight, ln1_bias, w2, b2, ln2_weight, ln2_bias, None,
                           values=False)
        n, width = left_index.shape[0], hidden.shape[1]
        check_float_tensor("grad_output", grad_output, ndim=2)
        if tuple(grad_output.shape) != (n, width):
            raise ValueError(f"grad_output must have shape ({n}, {width}), "
                             f"got {tuple(grad_output.shape)}")
        needs_input_grad = needs_flags(needs_input_grad, TENSOR_ARGUMENTS)
    need = dict(zip(TENSOR_ARGUMENTS, (bool(n) for n in needs_input_grad)))
    for name in ("left_index", "right_index", "rel_pos"):
        need[name] = False
    inputs = dict(zip(TENSOR_ARGUMENTS, (hidden, left_index, right_index, rel_pos,
                                         position_table, w1, b1, ln1_weight, ln1_bias, w2,
                                         b2, ln2_weight, ln2_bias)))
    with torch.no_grad():
        grads = _head_backward(grad_output.to(hidden.dtype), inputs, need, gathered, z1,
                               projection, y1, z2, mean1, rstd1, mean2, rstd2)
    # Each gradient in its input's dtype (a no-op except in autocast's layout, where the
    # GEMM operands' gradients come back to their fp32 parameters).
    return [grads[name].to(inputs[name].dtype) if grads.get(name) is not None
            else hidden.new_empty(0) for name in TENSOR_ARGUMENTS]


def _head_backward(dy, inputs: dict, need: dict, gathered, z1, projection, y1, z2, mean1,
                   rstd1, mean2, rstd2) -> dict:
    """The backward proper (no autograd): a dict name -> gradient for every name with
    ``need[name]``; each GEMM runs only if a wanted gradient uses it. The GEMMs are the
    gradients' own: two per linear layer over the N targets (d input, d weight), and three
    small ones on the P-row position table (its rows of dz1 summed by rel_pos, d table,
    d w1's position columns)."""
    hidden = inputs["hidden"]
    tokens, width = hidden.shape
    rows = inputs["position_table"].shape[0]
    device, dtype = hidden.device, hidden.dtype
    position_table, w1, w2 = _gemm_operands(hidden, inputs["position_table"], inputs["w1"],
                                            inputs["w2"])
    rel_pos = inputs["rel_pos"]
    need_layer1 = any(need[k] for k in ("hidden", "position_table", "w1", "b1",
                                        "ln1_weight", "ln1_bias"))
    need_dz1 = need["hidden"] or need["position_table"] or need["w1"]
    need_dz2 = need_layer1 or need["w2"]
    grads = {}

    # Layer 2: out = LN2(GELU(z2 + b2)), z2 = y1 @ W2^T.
    dz2, grads["b2"], grads["ln2_weight"], grads["ln2_bias"] = _epilogue_backward(
        dy, z2, inputs["b2"], inputs["ln2_weight"], mean2, rstd2, None, None,
        needs=(need_dz2, need["b2"], need["ln2_weight"], need["ln2_bias"]))
    if need["w2"]:
        grads["w2"] = torch.mm(dz2.t(), y1)
    if not need_layer1:
        return grads
    dy1 = torch.mm(dz2, w2)

    # Layer 1: y1 = LN1(GELU(z1 + projection[rel] + b1)).
    dz1, grads["b1"], grads["ln1_weight"], grads["ln1_bias"] = _epilogue_backward(
        dy1, z1, inputs["b1"], inputs["ln1_weight"], mean1, rstd1, projection, rel_pos,
        needs=(need_dz1, need["b1"], need["ln1_weight"], need["ln1_bias"]))
    if need["w1"] or need["position_table"]:
        # d(projection) (P, H): rows of dz1 summed by rel_pos, as a GEMM with a one-hot.
        one_hot = torch.nn.functional.one_hot(rel_pos, rows).to(dtype)  # (N, P)
        d_projection = torch.mm(one_hot.t(), dz1)
        if need["position_table"]:
            grads["position_table"] = torch.mm(d_projection, w1[:, 2 * width:])
        if need["w1"]:
            dw1 = _empty(w1.shape, inputs["w1"].dtype, device)
            # Two GEMMs into the column slices of one buffer (a column slice is not a
            # valid mm out=; the copies move H x (2H + E) elements, ~9 MB in large).
            dw1[:, : 2 * width].copy_(torch.mm(dz1.t(), gathered))
            dw1[:, 2 * width:].copy_(torch.mm(d_projection.t(), position_table))
            grads["w1"] = dw1
    if need["hidden"]:
        # (N, 2H) gradient of the gathered rows, viewed as (2N, H) in the interleaved
        # l0, r0, l1, r1 order of _boundary_rows, scattered with one index_add_.
        # Summed in fp32 (fp64 for fp64): a boundary row shared by many targets (a [CLS]
        # next to several spans, long spans' 15 targets) would otherwise round to
        # fp16/bf16 at every add.
        d_gathered = torch.mm(dz1, w1[:, : 2 * width]).view(-1, width)
        d_hidden = torch.zeros((tokens, width), dtype=accumulator_dtype(dtype), device=device)
        d_hidden.index_add_(0, _boundary_rows(inputs["left_index"], inputs["right_index"]),
                            d_gathered.to(d_hidden.dtype))
        grads["hidden"] = d_hidden
    return grads


def forward(hidden: torch.Tensor, left_index: torch.Tensor, right_index: torch.Tensor,
            rel_pos: torch.Tensor, position_table: torch.Tensor, w1: torch.Tensor,
            b1: torch.Tensor, ln1_weight: torch.Tensor, ln1_bias: torch.Tensor,
            w2: torch.Tensor, b2: torch.Tensor, ln2_weight: torch.Tensor,
            ln2_bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``out`` ``(N, H)`` of :func:`span_boundary_head_forward`, its arguments checked
    first (index ranges too, unless the caller checked them: ``skip_value_checks``), for
    callers outside ``spanbert_fast.ops``."""
    return span_boundary_head_forward(hidden, left_index, right_index, rel_pos,
                                      position_table, w1, b1, ln1_weight, ln1_bias, w2, b2,
                                      ln2_weight, ln2_bias, eps)[0]


def backward(grad_output: torch.Tensor, hidden: torch.Tensor, left_index: torch.Tensor,
             right_index: torch.Tensor, rel_pos: torch.Tensor, position_table: torch.Tensor,
             w1: torch.Tensor, b1: torch.Tensor, ln1_weight: torch.Tensor,
             ln1_bias: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
             ln2_weight: torch.Tensor, ln2_bias: torch.Tensor, eps: float,
             needs_input_grad: Sequence[bool]) -> List[torch.Tensor]:
    """Gradients of :func:`forward` for a caller that kept nothing from the forward (the
    kernel tests): checks the arguments, runs :func:`span_boundary_head_forward` for
    the saved tensors, then :func:`span_boundary_head_backward`. The custom op's autograd
    never comes here: it saved the forward's tensors.

    ``grad_output``: ``(N, H)``. ``needs_input_grad``: 13 bools in
    :data:`TENSOR_ARGUMENTS` order.
    """
    args = (hidden, left_index, right_index, rel_pos, position_table, w1, b1, ln1_weight,
            ln1_bias, w2, b2, ln2_weight, ln2_bias)
    _check_head_inputs(*args, eps, values=False)
    _, *saved = span_boundary_head_forward(*args, eps, check_arguments=False)
    # Checks grad_output and needs_input_grad (and the arguments' layout once more).
    return span_boundary_head_backward(grad_output, *args, *saved, needs_input_grad)


def not_supported_reasons(tensors: Sequence[torch.Tensor]) -> List[str]:
    """Why the head cannot take ``hidden`` (first of ``tensors``): a width over the fused
    epilogue's row of registers; an empty list when it can."""
    if not tensors or not tensors[0].is_floating_point() or tensors[0].dim() != 2:
        return []
    width = tensors[0].shape[1]
    if triton.next_power_of_2(max(width, 1)) > _MAX_BLOCK_N:
        return [f"the fused SBO epilogue holds a row in registers: width {width} is over "
                f"its {_MAX_BLOCK_N} elements"]
    return []
