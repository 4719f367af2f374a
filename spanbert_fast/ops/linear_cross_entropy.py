"""``linear_cross_entropy``: the MLM loss ``CE(hidden @ weight.T + bias, labels)`` without
ever holding the (tokens x vocab) logits.

The Triton path is a dedicated custom op that computes the gradients during the forward
(chunked over the vocabulary) and scales them in the backward; under fp16 with gradients it
uses the generic registration instead, whose backward reruns the loop with the upstream
(loss-scaled) gradient folded in, so a GradScaler's scale reaches every gradient before it
is rounded to fp16.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from . import checks, dispatch, reference
from .checks import (FLOAT_DTYPES, check_index_range, check_matmul_dtypes, check_same_device,
                     check_shape, check_tensor, value_checks_on)
from .registration import custom_op, loss_dtype, register_op


def _loss_fake(*args):
    return args[0].new_empty((), dtype=loss_dtype(args[0].dtype))


register_op(
    "linear_cross_entropy",
    [("hidden", "Tensor"), ("weight", "Tensor"), ("bias", "Tensor?"), ("labels", "Tensor"),
     ("ignore_index", "int")],
    reference.linear_cross_entropy,
    _loss_fake,
)


@torch.library.custom_op("spanbert_fast::fused_linear_cross_entropy", mutates_args=())
def _fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    labels: torch.Tensor, ignore_index: int, need_grads: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss/d hidden, d loss/d weight, d loss/d bias); empty grads when not needed."""
    with dispatch.without_autocast(hidden):
        loss, grad_hidden, grad_weight, grad_bias = dispatch.kernel_module(
            "linear_cross_entropy").linear_cross_entropy_forward(
                hidden, weight, bias, labels, ignore_index, need_grads,
                check_arguments=not checks.arguments_checked_upstream())
    # Distinct empty tensors: a custom op may not return one tensor twice (aliasing).
    return (loss, grad_hidden if grad_hidden is not None else hidden.new_empty(0),
            grad_weight if grad_weight is not None else hidden.new_empty(0),
            grad_bias if grad_bias is not None else hidden.new_empty(0))


@_fused_linear_cross_entropy.register_fake
def _(hidden, weight, bias, labels, ignore_index, need_grads):
    loss = hidden.new_empty((), dtype=loss_dtype(hidden.dtype))
    if not need_grads:
        return loss, hidden.new_empty(0), hidden.new_empty(0), hidden.new_empty(0)
    grad_bias = bias.new_empty(bias.shape) if bias is not None else hidden.new_empty(0)
    return loss, hidden.new_empty(hidden.shape), weight.new_empty(weight.shape), grad_bias


def _fused_ce_setup_context(ctx, inputs, output):
    _, grad_hidden, grad_weight, grad_bias = output
    ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
    ctx.has_bias = inputs[2] is not None


def _fused_ce_autograd(ctx, grad_loss, _gh, _gw, _gb):
    grad_hidden, grad_weight, grad_bias = ctx.saved_tensors
    scale = grad_loss.to(torch.float32)
    grads = [None, None, None]
    if ctx.needs_input_grad[0]:
        grads[0] = (grad_hidden * scale).to(grad_hidden.dtype)
    if ctx.needs_input_grad[1]:
        grads[1] = (grad_weight * scale).to(grad_weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grads[2] = (grad_bias * scale).to(grad_bias.dtype)
    return grads[0], grads[1], grads[2], None, None, None


_fused_linear_cross_entropy.register_autograd(_fused_ce_autograd,
                                              setup_context=_fused_ce_setup_context)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` over labels != ``ignore_index``.

    ``hidden``: ``(N, H)``; ``weight``: ``(V, H)``; ``bias``: ``(V,)`` or None; ``labels``:
    ``(N,)`` int64 in ``[0, V)`` or ``ignore_index``. Returns a 0-d fp32 tensor; 0.0 when no
    label is valid.
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=FLOAT_DTYPES)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape (vocab, {hidden.shape[1]}), got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
        check_shape("bias", bias, (weight.shape[0],))
    check_tensor("labels", labels, ndim=1, dtypes=(torch.int64,))
    check_shape("labels", labels, (hidden.shape[0],))
    check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    check_matmul_dtypes(hidden=hidden, weight=weight, bias=bias)
    if labels.numel() and value_checks_on():
        valid = labels[labels != ignore_index]
        check_index_range("labels", valid, 0, weight.shape[0])
    chosen = dispatch.resolve_backend(backend, "linear_cross_entropy",
                             [t for t in (hidden, weight, bias, labels) if t is not None])
    if chosen == "torch":
        return reference.linear_cross_entropy(hidden, weight, bias, labels, int(ignore_index))
    hidden, weight, bias = dispatch.autocast_matmul_inputs((hidden, weight, bias))
    need_grads = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    if need_grads and hidden.dtype == torch.float16:
        # fp16 under a GradScaler: gradients computed in the forward (scale 1) round
        # (softmax - onehot) / n_valid to fp16 before the loss scale is known, and every
        # value below 6e-8 flushes to zero for good. This op's backward instead reruns
        # the chunked loop with the upstream (scaled) gradient folded into dlogits in
        # fp32 before rounding, as plain torch does: one more logits GEMM, and no
        # (vocab x hidden) gradient held between forward and backward. bf16 has fp32's
        # exponent range and keeps the fused path.
        with checks.arguments_checked():
            return custom_op("linear_cross_entropy")(hidden, weight, bias, labels,
                                                      int(ignore_index), chosen)
    with checks.arguments_checked():
        return _fused_linear_cross_entropy(hidden, weight, bias, labels, int(ignore_index),
                                           need_grads)[0]
