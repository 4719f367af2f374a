"""Pieces every kernel file shares: exact (erf) GELU, accumulator dtypes, the launchers'
argument checks, and the NaN-poisonable buffer allocation that the tests use to catch
unwritten elements."""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator, List, Optional, Sequence

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


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_tensor(name: str, t, ndim: Optional[int] = None) -> None:
    """``t`` is a fp16/bf16/fp32/fp64 tensor (of ``ndim`` dimensions when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")


def check_grad_output(grad_output, like: torch.Tensor, like_name: str) -> None:
    """A backward's ``grad_output``: a float tensor of ``like``'s shape, on its device."""
    check_float_tensor("grad_output", grad_output)
    if grad_output.shape != like.shape:
        raise ValueError(f"grad_output must have {like_name}'s shape {tuple(like.shape)}, "
                         f"got {tuple(grad_output.shape)}")
    if grad_output.device != like.device:
        raise ValueError(f"grad_output must be on {like_name}'s device {like.device}, "
                         f"got {grad_output.device}")


def needs_flags(needs_input_grad, names: Sequence[str]) -> List[bool]:
    """A backward's ``needs_input_grad``: one bool per name, as a list of bools."""
    needs = list(needs_input_grad) if isinstance(needs_input_grad, (list, tuple)) else None
    if needs is None or len(needs) != len(names):
        raise ValueError(f"needs_input_grad must be a list of {len(names)} bools "
                         f"({', '.join(names)}), got {needs_input_grad!r}")
    return [bool(n) for n in needs]


# The launchers' value checks (labels and SBO indices in range) read tensor data: a host
# synchronisation per call on a GPU. A caller that has checked those values already, in one
# batched reduction for the whole step (spanbert_fast's models), switches them off for its
# thread with skip_value_checks(); called on their own the launchers keep checking.
class _ValueChecks(threading.local):
    """Set on first use in each thread, so that torch.compile's guards on it keep one kind."""

    def __init__(self) -> None:
        self.skipped = False


_value_checks = _ValueChecks()


def value_checks_enabled() -> bool:
    return not getattr(_value_checks, "skipped", False)


@contextlib.contextmanager
def skip_value_checks() -> Iterator[None]:
    previous = getattr(_value_checks, "skipped", False)
    _value_checks.skipped = True
    try:
        yield
    finally:
        _value_checks.skipped = previous
