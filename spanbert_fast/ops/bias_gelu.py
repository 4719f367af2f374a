"""``bias_gelu``: exact (erf) ``GELU(x + bias)``, the intermediate activation of BERT's FFN.

Its backward needs only the inputs (the kernel recomputes ``x + bias`` elementwise, which
costs a read it would pay to load a saved pre-activation anyway), so it uses the generic
registration.
"""

from __future__ import annotations

import torch

from . import reference
from .checks import FLOAT_DTYPES, check_same_device, check_shape, check_tensor
from .registration import register_op, run

register_op(
    "bias_gelu",
    [("x", "Tensor"), ("bias", "Tensor")],
    reference.bias_gelu,
    lambda x, bias: x.new_empty(x.shape),
)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Exact erf ``GELU(x + bias)``; ``x``: ``(..., features)``, ``bias``: ``(features,)``."""
    check_tensor("x", x, dtypes=FLOAT_DTYPES)
    check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., features), got a scalar")
    check_shape("bias", bias, (x.shape[-1],))
    check_same_device(x=x, bias=bias)
    return run("bias_gelu", backend, [x, bias], (x, bias), reference.bias_gelu)
