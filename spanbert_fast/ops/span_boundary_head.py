"""``span_boundary_head``: SpanBERT's span-boundary objective MLP over gathered boundaries.

``[hidden[left]; hidden[right]; position_table[rel_pos]] -> Linear -> GELU -> LayerNorm ->
Linear -> GELU -> LayerNorm``, as in the original release's ``BertPairTargetPredictionHead``.

The Triton path is a pair of dedicated custom ops. ``spanbert_fast::span_boundary_head_forward``
returns the output and what the backward needs (``kernels/span_boundary_head.py``'s
``SAVED_FOR_BACKWARD``: the gathered boundary rows, both GEMM outputs before bias and GELU,
the position projection, the first layer's output, both LayerNorms' per-row mean and
rstd); autograd saves them and ``spanbert_fast::span_boundary_head_backward`` reads them, so
the backward runs only the gradients' GEMMs, none of the forward's, and no statistics
reduction. The torch path is :func:`.reference.span_boundary_head` under plain autograd;
``torch.ops.spanbert_fast.span_boundary_head(..., backend)`` is a composite op: the
reference for ``"torch"``, this public function otherwise (see
:func:`.registration.register_composite`).
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from . import checks, dispatch, reference
from .checks import (FLOAT_DTYPES, check_index_range, check_matmul_dtypes, check_same_device,
                     check_shape, check_tensor)
from .registration import register_composite

_SCHEMA = [("hidden", "Tensor"), ("left_index", "Tensor"), ("right_index", "Tensor"),
           ("rel_pos", "Tensor"), ("position_table", "Tensor"), ("w1", "Tensor"),
           ("b1", "Tensor"), ("ln1_weight", "Tensor"), ("ln1_bias", "Tensor"),
           ("w2", "Tensor"), ("b2", "Tensor"), ("ln2_weight", "Tensor"),
           ("ln2_bias", "Tensor"), ("eps", "float")]
_TENSORS = len(_SCHEMA) - 1  # 13 tensor arguments, then eps
_INDEX_POSITIONS = (1, 2, 3)  # left_index, right_index, rel_pos: no gradient


@torch.library.custom_op("spanbert_fast::span_boundary_head_forward", mutates_args=())
def _span_boundary_head_forward(
    hidden: torch.Tensor, left_index: torch.Tensor, right_index: torch.Tensor,
    rel_pos: torch.Tensor, position_table: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor,
    ln1_weight: torch.Tensor, ln1_bias: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
    ln2_weight: torch.Tensor, ln2_bias: torch.Tensor, eps: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(out, gathered, z1, projection, y1, z2, mean1, rstd1, mean2, rstd2)``."""
    with dispatch.without_autocast(hidden):
        return tuple(dispatch.kernel_module("span_boundary_head").span_boundary_head_forward(
            hidden, left_index, right_index, rel_pos, position_table, w1, b1, ln1_weight,
            ln1_bias, w2, b2, ln2_weight, ln2_bias, eps,
            check_arguments=not checks.arguments_checked_upstream()))


@_span_boundary_head_forward.register_fake
def _(hidden, left_index, right_index, rel_pos, position_table, *rest):
    # Contiguous outputs, all in hidden's dtype (the GEMMs' dtype); statistics in fp32
    # (fp64 for fp64), as the kernel file allocates them.
    n, width = left_index.shape[0], hidden.shape[1]
    stats = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    rows = hidden.new_empty((n, width))
    return (rows, hidden.new_empty((n, 2 * width)), hidden.new_empty((n, width)),
            hidden.new_empty((position_table.shape[0], width)), hidden.new_empty((n, width)),
            hidden.new_empty((n, width)), *(hidden.new_empty((n,), dtype=stats)
                                            for _ in range(4)))


@torch.library.custom_op("spanbert_fast::span_boundary_head_backward", mutates_args=())
def _span_boundary_head_backward(
    grad_output: torch.Tensor, hidden: torch.Tensor, left_index: torch.Tensor,
    right_index: torch.Tensor, rel_pos: torch.Tensor, position_table: torch.Tensor,
    w1: torch.Tensor, b1: torch.Tensor, ln1_weight: torch.Tensor, ln1_bias: torch.Tensor,
    w2: torch.Tensor, b2: torch.Tensor, ln2_weight: torch.Tensor, ln2_bias: torch.Tensor,
    gathered: torch.Tensor, z1: torch.Tensor, projection: torch.Tensor, y1: torch.Tensor,
    z2: torch.Tensor, mean1: torch.Tensor, rstd1: torch.Tensor, mean2: torch.Tensor,
    rstd2: torch.Tensor, needs_input_grad: List[bool],
) -> List[torch.Tensor]:
    """One gradient per tensor argument (13), a 0-element tensor where not needed."""
    with dispatch.without_autocast(grad_output):
        return dispatch.kernel_module("span_boundary_head").span_boundary_head_backward(
            grad_output, hidden, left_index, right_index, rel_pos, position_table, w1, b1,
            ln1_weight, ln1_bias, w2, b2, ln2_weight, ln2_bias, gathered, z1, projection, y1,
            z2, mean1, rstd1, mean2, rstd2, needs_input_grad,
            check_arguments=not checks.arguments_checked_upstream())


@_span_boundary_head_backward.register_fake
def _(grad_output, *args):
    inputs, needs = args[:_TENSORS], args[-1]
    hidden = inputs[0]
    return [t.new_empty(t.shape) if need and i not in _INDEX_POSITIONS
            else hidden.new_empty(0) for i, (t, need) in enumerate(zip(inputs, needs))]


def _setup_context(ctx, inputs, output):
    saved = output[1:]
    ctx.save_for_backward(*inputs[:_TENSORS], *saved)
    ctx.mark_non_differentiable(*saved)


def _backward(ctx, grad_out, *_grad_saved):
    tensors = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) and i not in _INDEX_POSITIONS
             for i in range(_TENSORS)]
    with checks.arguments_checked():  # the forward's, checked then
        grads = _span_boundary_head_backward(grad_out.contiguous(), *tensors, needs)
    return (*[g if need else None for g, need in zip(grads, needs)], None)


_span_boundary_head_forward.register_autograd(_backward, setup_context=_setup_context)


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
    eps: float = 1e-12,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """The SBO MLP over gathered span boundaries (see :func:`spanbert_fast.ops.reference.span_boundary_head`).

    ``hidden``: ``(tokens, H)``; ``left_index``, ``right_index``, ``rel_pos``: ``(N,)``
    int64; ``position_table``: ``(P, E)``; ``w1``: ``(H, 2H + E)``; ``w2``: ``(H, H)``.
    Returns ``(N, H)``.
    """
    check_tensor("hidden", hidden, ndim=2, dtypes=FLOAT_DTYPES)
    tokens, width = hidden.shape
    for name, t in (("left_index", left_index), ("right_index", right_index), ("rel_pos", rel_pos)):
        check_tensor(name, t, ndim=1, dtypes=(torch.int64,))
    n = left_index.shape[0]
    check_shape("right_index", right_index, (n,))
    check_shape("rel_pos", rel_pos, (n,))
    check_tensor("position_table", position_table, ndim=2, dtypes=FLOAT_DTYPES)
    rows, pos_width = position_table.shape
    check_tensor("w1", w1, ndim=2, dtypes=FLOAT_DTYPES)
    check_shape("w1", w1, (width, 2 * width + pos_width))
    check_tensor("w2", w2, ndim=2, dtypes=FLOAT_DTYPES)
    check_shape("w2", w2, (width, width))
    for name, t in (("b1", b1), ("ln1_weight", ln1_weight), ("ln1_bias", ln1_bias),
                    ("b2", b2), ("ln2_weight", ln2_weight), ("ln2_bias", ln2_bias)):
        check_tensor(name, t, ndim=1, dtypes=FLOAT_DTYPES)
        check_shape(name, t, (width,))
    floats = dict(hidden=hidden, position_table=position_table, w1=w1, b1=b1,
                  ln1_weight=ln1_weight, ln1_bias=ln1_bias, w2=w2, b2=b2,
                  ln2_weight=ln2_weight, ln2_bias=ln2_bias)
    check_same_device(left_index=left_index, right_index=right_index, rel_pos=rel_pos,
                       **floats)
    check_matmul_dtypes(**floats)
    check_index_range("left_index", left_index, 0, tokens)
    check_index_range("right_index", right_index, 0, tokens)
    check_index_range("rel_pos", rel_pos, 0, rows)
    args = (hidden, left_index, right_index, rel_pos, position_table, w1, b1, ln1_weight,
            ln1_bias, w2, b2, ln2_weight, ln2_bias, float(eps))
    chosen = dispatch.resolve_backend(backend, "span_boundary_head",
                                      [hidden, position_table, w1, w2])
    if chosen == "torch":
        return reference.span_boundary_head(*args)
    # Autocast casts an nn.Linear's operands but never a custom op's: cast them here.
    with checks.arguments_checked():
        return _span_boundary_head_forward(*dispatch.autocast_matmul_inputs(args))[0]


register_composite("span_boundary_head", _SCHEMA, reference.span_boundary_head,
                   lambda *args: span_boundary_head(*args[:-1], backend=args[-1]))
