"""Argument checks of the public ops, run once at the public boundary.

Every message names the argument, what was expected and what came. Value checks (ids,
labels, indices in range) read tensor data: one host synchronisation each on a GPU. The
models check every value once per step in one batched reduction and then run their ops
inside :func:`values_checked`, which skips the per-call value checks here and in the kernel
launchers. An op called on its own checks.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Optional, Sequence

import torch

from . import dispatch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t, *, ndim: Optional[int] = None,
                 dtypes: Optional[Sequence[torch.dtype]] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        expected = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({expected}), got {t.dtype}")


def check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_matmul_dtypes(**tensors) -> None:
    """The float operands of an op that multiplies matrices share one dtype, as F.linear
    requires, unless autocast is on (it casts them; see dispatch.autocast_matmul_inputs)."""
    present = {name: t for name, t in tensors.items() if t is not None}
    first = next(iter(present.values()))
    if torch.is_autocast_enabled(first.device.type):
        return
    dtypes = {name: t.dtype for name, t in present.items()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n} {str(d).replace('torch.', '')}" for n, d in dtypes.items())
        raise TypeError(f"the float tensors must share one dtype (or run under torch.autocast), "
                        f"got {listing}")


def check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def values_checkable() -> bool:
    """Whether tensor data may be read on the host: not while torch.compile traces."""
    return not torch.compiler.is_compiling()


class _CheckState(threading.local):
    """This thread's check state. Every attribute is set on first use in each thread, so
    torch.compile's guards on it never change kind after the first call (an attribute
    missing from the instance, then present, would be two guards: one recompile)."""

    def __init__(self) -> None:
        self.done_upstream = False
        self.right_padded = None
        self.arguments_done = False


_checks = _CheckState()


def value_checks_on() -> bool:
    return values_checkable() and not getattr(_checks, "done_upstream", False)


@contextlib.contextmanager
def checks_state(**values):
    """Set attributes of this thread's check state for the block, then put them back."""
    previous = {name: getattr(_checks, name, None) for name in values}
    for name, value in values.items():
        setattr(_checks, name, value)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(_checks, name, value)


@contextlib.contextmanager
def values_checked(right_padded: Optional[bool] = None):
    """Run ops whose index/label values the caller has already checked (the models' one
    batched check per step): no per-call value check, so no per-call host sync.
    ``right_padded``: whether the attention mask the ops will see is right padding (ones,
    then zeros), when the caller read it in its check (None: unknown, read per call)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(checks_state(done_upstream=True, right_padded=right_padded))
        if dispatch.kernels_loaded():  # triton is importable: the launchers check too
            from ..kernels import _common as kernel_common
            stack.enter_context(kernel_common.skip_value_checks())
        yield


@contextlib.contextmanager
def arguments_checked():
    """Around a custom-op call of a public op (and its autograd backward): the arguments
    passed its checks, so the kernel launchers skip their own (``check_arguments=False``).
    A custom op called directly (``torch.ops.spanbert_fast.<op>``) still has its launcher
    check them."""
    with checks_state(arguments_done=True):
        yield


def arguments_checked_upstream() -> bool:
    return _checks.arguments_done


def is_right_padding(key_padding_mask: torch.Tensor) -> bool:
    """True when every row of the (batch, seq) bool mask is ones followed by zeros."""
    lengths = key_padding_mask.sum(dim=1)
    positions = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device)
    return bool(torch.equal(key_padding_mask, positions.unsqueeze(0) < lengths.unsqueeze(1)))


def mask_is_right_padded(key_padding_mask: torch.Tensor) -> bool:
    """What the caller already read (values_checked(right_padded=...)), else read it."""
    known = getattr(_checks, "right_padded", None)
    return known if known is not None else is_right_padding(key_padding_mask)


def check_index_range(name: str, t: torch.Tensor, low: int, high: int) -> None:
    """Every value of integer tensor ``t`` must lie in ``[low, high)``."""
    if t.numel() == 0 or not value_checks_on():
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi >= high:
        raise ValueError(f"{name} values must lie in [{low}, {high}), got min {lo}, max {hi}")
