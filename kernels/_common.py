"""Pieces every kernel file shares: exact (erf) GELU, accumulator dtypes, and the
NaN-poisonable buffer allocation that the tests use to catch unwritten elements."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)


@triton.jit
def gelu_erf(z):
    """Exact GELU ``z * Phi(z)`` (tl.math.erf: Python's math.erf in the interpreter,
    libdevice's __nv_erff on NVIDIA GPUs)."""
    return 0.5 * z * (1.0 + tl.math.erf(z * _SQRT1_2))


@triton.jit
def gelu_erf_derivative(z):
    """``d/dz [z * Phi(z)] = Phi(z) + z * phi(z)``."""
    cdf = 0.5 * (1.0 + tl.math.erf(z * _SQRT1_2))
    return cdf + z * tl.exp(-0.5 * z * z) * _INV_SQRT_2PI


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 statistics for fp64 inputs (the oracle's dtype), fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_accumulator_dtype(dtype: torch.dtype) -> tl.dtype:
    """:func:`accumulator_dtype` as a Triton dtype, for a ``tl.constexpr`` argument."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def empty_buffer(shape, dtype: torch.dtype, device: torch.device, poison: bool) -> torch.Tensor:
    """``torch.empty``, or NaN-filled when ``poison`` (a kernel file's POISON_BUFFERS test
    hook): an element the kernel fails to write then shows up as NaN in the result."""
    buffer = torch.empty(shape, dtype=dtype, device=device)
    if poison:
        buffer.fill_(float("nan"))
    return buffer
