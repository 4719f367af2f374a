"""Pieces every kernel file shares: exact (erf) GELU, accumulator dtypes, the launchers'
argument checks, and the NaN-poisonable buffer allocation that the tests use to catch
unwritten elements."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator, List, Optional, Sequence

import torch
import triton
import triton.language as tl

# Read once, here: whether kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 when
# triton was first imported), which takes one fixed launch config per kernel.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

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


@triton.jit
def layer_norm_row(h, mask, n_cols, eps):
    """One register-resident row's LayerNorm statistics: ``(h - mean)`` (0 on masked
    lanes), mean and ``1 / sqrt(var + eps)``. Two-pass variance: no E[h^2] - E[h]^2
    cancellation."""
    mean = tl.sum(h, axis=0) / n_cols
    centered = tl.where(mask, h - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / n_cols
    return centered, mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def layer_norm_row_backward(dy, weight, x_hat, rstd, n_cols):
    """The gradient at a LayerNorm's input row from the saved statistics:
    ``g = dy * weight``, ``rstd * (g - mean(g * x_hat) * x_hat - mean(g))`` (dy and weight
    loaded as 0 on masked lanes, x_hat 0 there)."""
    g = dy * weight
    mean_g_xhat = tl.sum(g * x_hat, axis=0) / n_cols
    mean_g = tl.sum(g, axis=0) / n_cols
    return (g - x_hat * mean_g_xhat - mean_g) * rstd


def row_num_warps(block_n: int) -> int:
    """The row kernels' rule: one warp per 256 columns, 1..16 warps (8 elements per
    thread: one 16-byte load of fp16/bf16 per tensor; the row reductions stay inside a few
    warps); hidden 768 and 1024 (BLOCK_N 1024) get 4, the interpreter 1. A starting rule,
    not yet tuned on a GPU."""
    if INTERPRET:
        return 1
    return min(max(block_n // 256, 1), 16)


def backward_programs(n_rows: int, device: torch.device, interpreter_programs: int) -> int:
    """Programs of a row kernel's backward, each owning a contiguous run of rows and one
    row of the column-sum partials: 2 per SM on a GPU (enough to fill it; the partials stay
    ~1 MB at hidden 1024), ``interpreter_programs`` on the CPU so tests cover several
    programs with uneven row counts."""
    if device.type == "cuda":
        cap = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        cap = interpreter_programs
    return max(1, min(n_rows, cap))


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
    """Whether a launcher may read tensor values to check them: not inside
    skip_value_checks(), and never while a CUDA graph is being captured (a device read
    there is an error, and the step's values are the caller's to check)."""
    if getattr(_value_checks, "skipped", False):
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


@contextlib.contextmanager
def skip_value_checks() -> Iterator[None]:
    previous = getattr(_value_checks, "skipped", False)
    _value_checks.skipped = True
    try:
        yield
    finally:
        _value_checks.skipped = previous
