"""``layer_norm``: ``LayerNorm(x + residual)`` over the last dim with fp32 statistics."""

from __future__ import annotations

from typing import Optional

import torch

from . import reference
from .checks import FLOAT_DTYPES, check_same_device, check_shape, check_tensor
from .registration import register_op, run

register_op(
    "layer_norm",
    [("x", "Tensor"), ("weight", "Tensor"), ("bias", "Tensor"), ("eps", "float"),
     ("residual", "Tensor?")],
    reference.layer_norm,
    lambda x, weight, bias, eps, residual: x.new_empty(
        x.shape, dtype=x.dtype if residual is None else torch.promote_types(x.dtype,
                                                                           residual.dtype)),
)


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
    return run("layer_norm", backend, [x, weight, bias, residual],
               (x, weight, bias, float(eps), residual), reference.layer_norm)
