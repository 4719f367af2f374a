"""``layer_norm``: ``LayerNorm(x + residual)`` over the last dim with fp32 statistics.

The Triton path is a pair of dedicated custom ops. ``spanbert_fast::layer_norm_forward``
returns ``(y, mean, rstd)``: the kernel writes each row's mean and ``1 / sqrt(var + eps)``
(fp32; fp64 when ``x + residual`` is fp64) while it normalises the row, and autograd saves
them. ``spanbert_fast::layer_norm_backward`` reads them: the backward runs no statistics
reduction. For ``x_hat`` it re-adds ``x + residual`` from the saved inputs (one elementwise
add of two rows the backward loads anyway), rather than saving the sum: that would cost a
``rows x hidden`` write in the forward and hold the tensor until the backward.

The torch path is :func:`.reference.layer_norm` under plain autograd.
``torch.ops.spanbert_fast.layer_norm(x, weight, bias, eps, residual, backend)`` is a
composite op: the reference for ``"torch"``, this public function otherwise (see
:func:`.registration.register_composite`).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import checks, dispatch, reference
from .checks import FLOAT_DTYPES, check_same_device, check_shape, check_tensor
from .registration import register_composite


def _output_dtype(x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.dtype:
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _statistics_dtype(x: torch.Tensor, residual: Optional[torch.Tensor]) -> torch.dtype:
    """fp32 statistics, fp64 for fp64 rows (the kernel's accumulator dtype)."""
    return torch.float64 if _output_dtype(x, residual) == torch.float64 else torch.float32


@torch.library.custom_op("spanbert_fast::layer_norm_forward", mutates_args=())
def _layer_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
    residual: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)``; ``mean``, ``rstd``: ``x.shape[:-1]``, the statistics dtype."""
    with dispatch.without_autocast(x):
        return dispatch.kernel_module("layer_norm").layer_norm_forward(
            x, weight, bias, eps, residual,
            check_arguments=not checks.arguments_checked_upstream())


@_layer_norm_forward.register_fake
def _(x, weight, bias, eps, residual):
    # Contiguous outputs (new_empty, not empty_like, which would copy a transposed x's
    # strides): the kernel writes contiguous rows whatever the inputs' strides.
    stats_dtype = _statistics_dtype(x, residual)
    return (x.new_empty(x.shape, dtype=_output_dtype(x, residual)),
            x.new_empty(x.shape[:-1], dtype=stats_dtype),
            x.new_empty(x.shape[:-1], dtype=stats_dtype))


@torch.library.custom_op("spanbert_fast::layer_norm_backward", mutates_args=())
def _layer_norm_backward(
    grad_output: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
    residual: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
    needs_input_grad: List[bool],
) -> List[torch.Tensor]:
    """``[dx, dweight, dbias, dresidual]``, a 0-element tensor where not needed."""
    with dispatch.without_autocast(grad_output):
        return dispatch.kernel_module("layer_norm").layer_norm_backward(
            grad_output, x, weight, bias, residual, mean, rstd, needs_input_grad,
            check_arguments=not checks.arguments_checked_upstream())


@_layer_norm_backward.register_fake
def _(grad_output, x, weight, bias, residual, mean, rstd, needs_input_grad):
    return [t.new_empty(t.shape) if need and t is not None else grad_output.new_empty(0)
            for t, need in zip((x, weight, bias, residual), needs_input_grad)]


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps, residual = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, residual, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, _grad_mean, _grad_rstd):
    x, weight, bias, residual, mean, rstd = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) for i in (0, 1, 2, 4)]
    needs[3] = needs[3] and residual is not None
    with checks.arguments_checked():  # the forward's, checked then
        dx, dweight, dbias, dresidual = _layer_norm_backward(
            grad_y.contiguous(), x, weight, bias, residual, mean, rstd, needs)
    return (dx if needs[0] else None, dweight if needs[1] else None,
            dbias if needs[2] else None, None, dresidual if needs[3] else None)


_layer_norm_forward.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float = 1e-12,
    *,
    residual: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """``LayerNorm(x + residual)`` over the last dim, fp32 statistics.

    ``x``, ``residual``: ``(..., hidden)`` float tensors; ``weight``, ``bias``:
    ``(hidden,)``. Returns ``x``'s shape in the dtype of ``x + residual`` (``x``'s without
    a residual): a bf16 sublayer output added to an fp32 residual stream (autocast) stays
    fp32, as in transformers.
    """
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., hidden), got a scalar")
    hidden = x.shape[-1]
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES)
    check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
    check_shape("weight", weight, (hidden,))
    check_shape("bias", bias, (hidden,))
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES)
        check_shape("residual", residual, x.shape)
    if not (float(eps) > 0.0):
        raise ValueError(f"eps must be > 0, got {eps!r}")
    check_same_device(x=x, weight=weight, bias=bias, residual=residual)
    tensors = [t for t in (x, weight, bias, residual) if t is not None]
    if dispatch.resolve_backend(backend, "layer_norm", tensors) == "torch":
        return reference.layer_norm(x, weight, bias, float(eps), residual)
    with checks.arguments_checked():
        return _layer_norm_forward(x, weight, bias, float(eps), residual)[0]


register_composite(
    "layer_norm",
    [("x", "Tensor"), ("weight", "Tensor"), ("bias", "Tensor"), ("eps", "float"),
     ("residual", "Tensor?")],
    reference.layer_norm,
    lambda x, weight, bias, eps, residual, backend: layer_norm(
        x, weight, bias, eps, residual=residual, backend=backend),
)
