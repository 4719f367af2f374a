"""Which backend runs an op: the Triton kernels' own reasons, collected in one place.

A Triton kernel file ``kernels/<op>.py`` (installed as ``spanbert_fast.kernels.<op>``, named
after the op it serves) exports its launchers and ``not_supported_reasons(tensors)``: what
it cannot run (device, dtype, head dim, row width, layout). Dispatch has no per-op limits of
its own; it adds only what no kernel file can know (triton missing, the interpreter's
broken bf16 ``tl.dot``, tensors off CUDA) and turns the list into a choice or one error.

``backend="auto"`` takes ``triton`` on CUDA tensors when the kernel has no reason to refuse
and ``torch`` otherwise; ``SPANBERT_FAST_BACKEND=torch|triton`` overrides ``auto``. An
explicit ``triton`` that cannot run raises :class:`BackendUnavailableError` listing every
reason, never a silent substitution.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import torch

__all__ = ["BACKENDS", "OPS", "BackendUnavailableError", "resolve_backend", "refuse",
           "explicit_backend", "triton_reasons", "kernel_module", "triton_ops_available",
           "without_autocast", "autocast_matmul_inputs", "warn_once"]

BACKENDS = ("auto", "torch", "triton")
ENV_BACKEND = "SPANBERT_FAST_BACKEND"

# Every op the models dispatch; each has kernels/<op>.py.
OPS = ("attention", "layer_norm", "bias_gelu", "span_boundary_head", "linear_cross_entropy")

# Entry points each kernel file must export besides not_supported_reasons. bias_gelu uses
# the generic launcher pair ``forward(*op_args)`` / ``backward(grad_output, *op_args,
# needs_input_grad)``; the others have dedicated custom ops that save what their backward
# needs (attention its log-sum-exp, layer_norm the rows' mean and rstd, span_boundary_head
# its GEMM outputs and LayerNorm statistics; linear_cross_entropy computes its gradients
# in the forward and keeps the generic pair for its loss-scaled fp16 path).
KERNEL_ENTRY_POINTS: Dict[str, Tuple[str, ...]] = {
    "attention": ("attention_forward", "attention_backward"),
    "layer_norm": ("layer_norm_forward", "layer_norm_backward"),
    "bias_gelu": ("forward", "backward"),
    "span_boundary_head": ("span_boundary_head_forward", "span_boundary_head_backward"),
    "linear_cross_entropy": ("linear_cross_entropy_forward", "forward", "backward"),
}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op on these inputs; the message says why."""


_KERNEL_MODULES: Dict[str, object] = {}
_kernel_import_errors: Dict[str, str] = {}
_triton_import_error: Optional[str] = None
_triton_probed = False


def probe_triton() -> None:
    """Import triton and every kernel file once; remember why not where that fails."""
    global _triton_probed, _triton_import_error
    if _triton_probed:
        return
    _triton_probed = True
    try:
        importlib.import_module("triton")
    except Exception as err:  # ImportError, or a broken install raising anything
        _triton_import_error = f"triton cannot be imported ({type(err).__name__}: {err})"
        return
    for op in OPS:
        try:
            module = importlib.import_module(f"spanbert_fast.kernels.{op}")
        except Exception as err:
            _kernel_import_errors[op] = f"{type(err).__name__}: {err}"
            continue
        needed = KERNEL_ENTRY_POINTS[op] + ("not_supported_reasons",)
        missing = [name for name in needed if not hasattr(module, name)]
        if missing:
            _kernel_import_errors[op] = f"spanbert_fast.kernels.{op} lacks {missing}"
        else:
            _KERNEL_MODULES[op] = module


def triton_ops_available() -> bool:
    """Whether every op's Triton kernel imported (triton is there and works)."""
    probe_triton()
    return all(op in _KERNEL_MODULES for op in OPS)


def kernels_loaded() -> bool:
    """Whether any kernel file has been imported (so their launchers' switches exist)."""
    return bool(_KERNEL_MODULES)


def triton_reasons(op: str, tensors: Sequence[torch.Tensor]) -> List[str]:
    """Why the Triton backend cannot run ``op`` on ``tensors`` (empty list: it can)."""
    probe_triton()
    reasons = []
    if _triton_import_error is not None:
        reasons.append(_triton_import_error)
    if op in _kernel_import_errors:
        reasons.append(f"the Triton kernel for '{op}' failed to import "
                       f"({_kernel_import_errors[op]})")
    elif op not in _KERNEL_MODULES and _triton_import_error is None:
        reasons.append(f"no Triton kernel is implemented for '{op}'")
    if op in _KERNEL_MODULES:
        reasons.extend(_KERNEL_MODULES[op].not_supported_reasons(tensors))
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if (interpret and op == "attention" and tensors and tensors[0].is_floating_point()
            and tensors[0].dtype == torch.bfloat16):
        # Measured: relative errors of ~1e8 from the interpreter's bf16 tl.dot (triton 3.7).
        reasons.append("bf16 tl.dot gives wrong results in the Triton interpreter "
                       "(TRITON_INTERPRET=1): use fp16 or fp32 there, or a GPU")
    for t in tensors:
        if t.device.type != "cuda" and not interpret:
            reasons.append(
                f"tensors are on {t.device.type}; Triton needs CUDA tensors "
                "(or TRITON_INTERPRET=1 for the CPU interpreter)")
            break
    return reasons


def kernel_module(op: str):
    """The Triton kernel module of ``op``; BackendUnavailableError with the reasons when it
    cannot be had."""
    probe_triton()
    module = _KERNEL_MODULES.get(op)
    if module is None:
        raise BackendUnavailableError(f"backend 'triton' cannot run {op}: "
                                      + "; ".join(triton_reasons(op, [])))
    return module


def describe(tensors: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"
                     for t in tensors)


def refuse(op: str, tensors: Sequence[torch.Tensor], reasons: Sequence[str]):
    """The one error an explicit ``triton`` gets: every reason and the inputs."""
    return BackendUnavailableError(
        f"backend 'triton' cannot run {op} on inputs [{describe(tensors)}]:\n  - "
        + "\n  - ".join(reasons) + "\nUse backend='torch' (or 'auto').")


def explicit_backend(backend: str) -> str:
    """``backend`` as the user set it: the argument, or SPANBERT_FAST_BACKEND for "auto"."""
    if backend == "auto":
        return os.environ.get(ENV_BACKEND, "").strip().lower() or "auto"
    return backend


def resolve_backend(backend: str, op: str, tensors: Sequence[torch.Tensor]) -> str:
    """Turn ``auto``/``torch``/``triton`` into the backend that will run ``op``.

    ``auto`` honours ``SPANBERT_FAST_BACKEND``; an explicit ``triton`` that cannot run
    raises :class:`BackendUnavailableError` listing every reason. Under ``auto`` a CUDA
    input the kernel refuses runs on torch with one warning naming the reasons.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get(ENV_BACKEND, "").strip().lower()
        if forced:
            if forced not in ("torch", "triton"):
                raise ValueError(
                    f"{ENV_BACKEND} must be 'torch' or 'triton', got {forced!r}")
            backend = forced
        else:
            if not any(t.device.type == "cuda" for t in tensors):
                return "torch"
            reasons = triton_reasons(op, tensors)
            if not reasons:
                return "triton"
            warn_once(f"fallback:{op}:{'; '.join(reasons)}",
                      f"{op}: the Triton kernel cannot run these inputs "
                      f"({'; '.join(reasons)}); running the torch backend")
            return "torch"
    if backend == "triton":
        reasons = triton_reasons(op, tensors)
        if reasons:
            raise refuse(op, tensors, reasons)
    return backend


_warned: set = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


# --------------------------------------------------------------------------------------
# Autocast. Custom-op bodies are opaque to autocast, but a torch.mm inside a launcher would
# still follow it in eager mode (and not in a compiled graph, whose fake declares the input
# dtypes): bodies run with autocast off, and ops that multiply matrices get their float
# inputs cast to the autocast dtype first, as autocast casts an nn.Linear's. The torch
# backend runs the reference under autocast itself and needs neither.
# --------------------------------------------------------------------------------------
def without_autocast(tensor: Optional[torch.Tensor]):
    device_type = tensor.device.type if tensor is not None else "cpu"
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_matmul_inputs(args: tuple) -> tuple:
    """``args`` with every float tensor cast to the active autocast dtype of the first
    tensor's device (unchanged when autocast is off there)."""
    first = next(a for a in args if isinstance(a, torch.Tensor))
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return args
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)
