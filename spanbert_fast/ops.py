"""One function per fused op: validate the inputs, pick a backend, run it.

Backends
--------
``torch``  plain PyTorch; runs anywhere, differentiates through plain autograd, and
           ``torch.compile`` traces straight through it. Attention is
           :mod:`spanbert_fast.torch_backend` (SDPA, padded and packed); the other ops are
           the single fused torch calls of :mod:`spanbert_fast.reference`, the oracle.
``triton`` fused kernels from :mod:`spanbert_fast.kernels`, reached through the
           ``torch.library`` custom ops registered below so that ``torch.compile`` sees one
           opaque node (no graph break) with a fake (meta) implementation.

``backend="auto"`` takes ``triton`` on CUDA tensors when a kernel for the op is available
and ``torch`` otherwise; ``SPANBERT_FAST_BACKEND=torch|triton`` overrides ``auto``.
Asking for a backend that cannot run raises one error that lists every reason and the
input shapes and dtypes, never a silent substitution.

The custom ops (``torch.ops.spanbert_fast.<op>``) take the backend name as their last
argument; their backward is a second custom op (``<op>_backward``). For the ``torch``
backend that backward recomputes the reference under autograd, which is what a kernel
backend must match.
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import threading
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import reference, torch_backend

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "resolve_backend",
    "attention",
    "layer_norm",
    "bias_gelu",
    "span_boundary_head",
    "linear_cross_entropy",
]

BACKENDS = ("auto", "torch", "triton")
_ENV_BACKEND = "SPANBERT_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op on these inputs; the message says why."""


# --------------------------------------------------------------------------------------
# Backend registry. A Triton kernel file ``kernels/<file>.py`` (installed as
# ``spanbert_fast.kernels.<file>``) exposes two launchers that follow the op's argument
# order: ``forward(*op_args) -> Tensor`` and
# ``backward(grad_output, *op_args, needs_input_grad) -> list`` (one tensor per tensor
# argument; a 0-element tensor where no gradient is wanted). The kernel files know nothing
# of modules or of this registry; the table below maps each op to its file.
# --------------------------------------------------------------------------------------
_TRITON_KERNEL_FILES: Dict[str, str] = {
    "attention": "attention",
    "layer_norm": "layer_norm",
    "bias_gelu": "gelu",
    "span_boundary_head": "span_boundary",
    "linear_cross_entropy": "cross_entropy",
}
# Entry points each kernel file must export. Attention saves its log-sum-exp for the
# backward and the fused linear cross-entropy computes its gradients during the forward,
# so both have dedicated custom ops (flash_attention_*, fused_linear_cross_entropy below)
# besides the generic pair.
_KERNEL_ENTRY_POINTS: Dict[str, Tuple[str, ...]] = {
    "attention": ("attention_forward", "attention_backward"),
    "linear_cross_entropy": ("linear_cross_entropy_forward", "forward", "backward"),
}
_KERNEL_MODULES: Dict[str, object] = {}
_kernel_import_errors: Dict[str, str] = {}
_triton_import_error: Optional[str] = None
_triton_probed = False


def _probe_triton() -> None:
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
    for op, file in _TRITON_KERNEL_FILES.items():
        try:
            module = importlib.import_module(f"spanbert_fast.kernels.{file}")
        except ModuleNotFoundError as err:
            if err.name == f"spanbert_fast.kernels.{file}":
                continue  # not written yet: reported as "no Triton kernel" below
            _kernel_import_errors[op] = f"{type(err).__name__}: {err}"
            continue
        except Exception as err:
            _kernel_import_errors[op] = f"{type(err).__name__}: {err}"
            continue
        needed = _KERNEL_ENTRY_POINTS.get(op, ("forward", "backward")) + (
            "not_supported_reasons",)
        missing = [name for name in needed if not hasattr(module, name)]
        if missing:
            _kernel_import_errors[op] = f"spanbert_fast.kernels.{file} lacks {missing}"
        else:
            _KERNEL_MODULES[op] = module


def _triton_reasons(op: str, tensors: Sequence[torch.Tensor]) -> List[str]:
    """Why the Triton backend cannot run ``op`` on ``tensors`` (empty list: it can)."""
    _probe_triton()
    reasons = []
    if _triton_import_error is not None:
        reasons.append(_triton_import_error)
    if op in _kernel_import_errors:
        reasons.append(f"the Triton kernel for '{op}' failed to import "
                       f"({_kernel_import_errors[op]})")
    elif op not in _KERNEL_MODULES and _triton_import_error is None:
        reasons.append(f"no Triton kernel is implemented for '{op}' yet")
    if op in _KERNEL_MODULES:
        # What the kernel itself can run (head dim, row width, dtype): one place, the
        # kernel file, instead of limits copied here.
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


def _kernel_module(op: str):
    """The Triton kernel module of ``op``, imported on first use; raises
    BackendUnavailableError with the reasons when it cannot be had."""
    _probe_triton()
    module = _KERNEL_MODULES.get(op)
    if module is None:
        raise BackendUnavailableError(f"backend 'triton' cannot run {op}: "
                                      + "; ".join(_triton_reasons(op, [])))
    return module


def _describe(tensors: Sequence[torch.Tensor]) -> str:
    return ", ".join(f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}"
                     for t in tensors)


def _explicit_backend(backend: str) -> str:
    """``backend`` as the user set it: the argument, or SPANBERT_FAST_BACKEND for "auto"."""
    if backend == "auto":
        return os.environ.get(_ENV_BACKEND, "").strip().lower() or "auto"
    return backend


def resolve_backend(backend: str, op: str, tensors: Sequence[torch.Tensor]) -> str:
    """Turn ``auto``/``torch``/``triton`` into the backend that will run ``op``.

    ``auto`` honours ``SPANBERT_FAST_BACKEND``; an explicit ``triton`` that cannot run
    raises :class:`BackendUnavailableError` listing every reason.
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        forced = os.environ.get(_ENV_BACKEND, "").strip().lower()
        if forced:
            if forced not in ("torch", "triton"):
                raise ValueError(
                    f"{_ENV_BACKEND} must be 'torch' or 'triton', got {forced!r}")
            backend = forced
        else:
            on_cuda = any(t.device.type == "cuda" for t in tensors)
            if on_cuda and not _triton_reasons(op, tensors):
                return "triton"
            return "torch"
    if backend == "triton":
        reasons = _triton_reasons(op, tensors)
        if reasons:
            raise BackendUnavailableError(
                f"backend 'triton' cannot run {op} on inputs [{_describe(tensors)}]:\n  - "
                + "\n  - ".join(reasons) + "\nUse backend='torch' (or 'auto').")
    return backend


# --------------------------------------------------------------------------------------
# Validation helpers: every message names the argument, what was expected and what came.
# --------------------------------------------------------------------------------------
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_tensor(name: str, t, *, ndim: Optional[int] = None,
                  dtypes: Optional[Sequence[torch.dtype]] = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        expected = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({expected}), got {t.dtype}")


def _check_same_device(**tensors) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def _check_matmul_dtypes(**tensors) -> None:
    """The float operands of an op that multiplies matrices share one dtype, as F.linear
    requires, unless autocast is on (it casts them; see _autocast_matmul_inputs)."""
    present = {name: t for name, t in tensors.items() if t is not None}
    first = next(iter(present.values()))
    if torch.is_autocast_enabled(first.device.type):
        return
    dtypes = {name: t.dtype for name, t in present.items()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n} {str(d).replace('torch.', '')}" for n, d in dtypes.items())
        raise TypeError(f"the float tensors must share one dtype (or run under torch.autocast), "
                        f"got {listing}")


def _check_shape(name: str, t: torch.Tensor, shape: Sequence[int]) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _values_checkable() -> bool:
    """Whether tensor data may be read on the host: not while torch.compile traces."""
    return not torch.compiler.is_compiling()


# Value checks (ids, labels, indices in range) read tensor data: one host synchronisation
# each on a GPU, per op call and per layer. The models check every value once per step in
# one batched reduction and then run their ops inside values_checked(), which skips the
# per-call checks here and in the kernel launchers. An op called on its own checks.
_checks = threading.local()


def _value_checks_on() -> bool:
    return _values_checkable() and not getattr(_checks, "done_upstream", False)


@contextlib.contextmanager
def _checks_state(**values):
    """Set attributes of this thread's ``_checks`` for the block, then put them back."""
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
        stack.enter_context(_checks_state(done_upstream=True, right_padded=right_padded))
        if _KERNEL_MODULES:  # triton is importable: the launchers check too
            from .kernels import _common as kernel_common
            stack.enter_context(kernel_common.skip_value_checks())
        yield


def _mask_is_right_padded(key_padding_mask: torch.Tensor) -> bool:
    """What the caller already read (values_checked(right_padded=...)), else read it."""
    known = getattr(_checks, "right_padded", None)
    return known if known is not None else _is_right_padding(key_padding_mask)


def _check_index_range(name: str, t: torch.Tensor, low: int, high: int) -> None:
    """Every value of integer tensor ``t`` must lie in ``[low, high)``."""
    if t.numel() == 0 or not _value_checks_on():
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < low or hi >= high:
        raise ValueError(f"{name} values must lie in [{low}, {high}), got min {lo}, max {hi}")


# --------------------------------------------------------------------------------------
# Autocast. Custom-op bodies are opaque to autocast, but a torch.mm inside a launcher would
# still follow it in eager mode (and not in a compiled graph, whose fake declares the input
# dtypes): bodies run with autocast off, and ops that multiply matrices get their float
# inputs cast to the autocast dtype first, as autocast casts an nn.Linear's. The torch
# backend runs the reference under autocast itself and needs neither.
# --------------------------------------------------------------------------------------
def _without_autocast(tensor: Optional[torch.Tensor]):
    device_type = tensor.device.type if tensor is not None else "cpu"
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _autocast_matmul_inputs(args: tuple) -> tuple:
    """``args`` with every float tensor cast to the active autocast dtype of the first
    tensor's device (unchanged when autocast is off there)."""
    first = next(a for a in args if isinstance(a, torch.Tensor))
    device_type = first.device.type
    if not torch.is_autocast_enabled(device_type):
        return args
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


# Ops whose Triton path multiplies matrices (see above).
_AUTOCAST_MATMUL_OPS = ("span_boundary_head",)


# --------------------------------------------------------------------------------------
# Custom-op registration, one generic mechanism for every op.
# --------------------------------------------------------------------------------------
def _tensor_positions(schema_args: Sequence[Tuple[str, str]]) -> List[int]:
    return [i for i, (_, kind) in enumerate(schema_args) if kind.startswith("Tensor")]


def _register_op(name: str, schema_args: Sequence[Tuple[str, str]], reference_fn: Callable,
                 output_fake: Callable) -> Callable:
    """Register ``spanbert_fast::<name>`` and ``spanbert_fast::<name>_backward``.

    ``schema_args``: ``(arg_name, schema_type)`` in call order, without the trailing
    ``str backend``. The forward returns one tensor. The backward takes the upstream
    gradient, the forward's arguments and ``needs_input_grad`` (one bool per tensor
    argument), and returns one tensor per tensor argument (a 0-element tensor where no
    gradient is needed or the input was None).
    """
    qualified = f"spanbert_fast::{name}"
    arg_list = ", ".join(f"{kind} {arg}" for arg, kind in schema_args)
    tensor_pos = _tensor_positions(schema_args)

    def forward_impl(*args):
        *op_args, backend = args
        if backend == "torch":
            with torch.no_grad():
                return reference_fn(*op_args).contiguous()
        if name in _KERNEL_ENTRY_POINTS and "forward" not in _KERNEL_ENTRY_POINTS[name]:
            raise ValueError(f"torch.ops.spanbert_fast.{name} runs backend 'torch' only; its "
                             "Triton kernel has a dedicated op (use spanbert_fast.ops."
                             f"{name}, which picks it)")
        with _without_autocast(op_args[0]):
            return _kernel_module(name).forward(*op_args)

    def backward_impl(grad_output, *args):
        *op_args, needs, backend = args
        if backend != "torch":
            with _without_autocast(grad_output):
                return _kernel_module(name).backward(grad_output, *op_args, needs)
        # Differentiate the reference: the ground truth a kernel must match. A custom op
        # runs below the autograd dispatch key, so torch.autograd would record nothing
        # here; torch.func.vjp carries its own differentiation level and works.
        wanted = [pos for slot, pos in enumerate(tensor_pos)
                  if needs[slot] and op_args[pos] is not None]
        grads = {}
        if wanted:
            def with_wanted(*diff_inputs):
                call = list(op_args)
                for pos, value in zip(wanted, diff_inputs):
                    call[pos] = value
                return reference_fn(*call)

            _, vjp = torch.func.vjp(with_wanted, *[op_args[p] for p in wanted])
            grads = dict(zip(wanted, vjp(grad_output)))
        # Fresh copies: the grads of x and residual in x + residual are one tensor, and a
        # custom op may not return aliases (this is the oracle path; speed is secondary).
        return [grads[pos].clone(memory_format=torch.contiguous_format) if pos in grads
                else grad_output.new_empty(0) for pos in tensor_pos]

    forward_op = torch.library.custom_op(
        qualified, forward_impl, mutates_args=(),
        schema=f"({arg_list}, str backend) -> Tensor")
    backward_op = torch.library.custom_op(
        f"{qualified}_backward", backward_impl, mutates_args=(),
        schema=f"(Tensor grad_output, {arg_list}, bool[] needs_input_grad, str backend) -> Tensor[]")

    # Fakes describe contiguous outputs (new_empty, not empty_like, which would copy a
    # transposed input's strides): both backends return contiguous tensors whatever the
    # inputs' strides, and torch.compile trusts the fake's strides.
    @forward_op.register_fake
    def _(*args):
        return output_fake(*args[:-1])

    @backward_op.register_fake
    def _(grad_output, *args):
        *op_args, needs, _backend = args
        out = []
        for slot, pos in enumerate(tensor_pos):
            t = op_args[pos]
            out.append(t.new_empty(t.shape) if needs[slot] and t is not None
                       else grad_output.new_empty(0))
        return out

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*[inputs[p] for p in tensor_pos])
        ctx.scalars = [None if p in tensor_pos else a for p, a in enumerate(inputs)]

    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if a is None and p in tensor_pos else a
                for p, a in enumerate(ctx.scalars)]
        backend = args.pop()
        needs = [bool(ctx.needs_input_grad[p]) for p in tensor_pos]
        grads = backward_op(grad_output.contiguous(), *args, needs, backend)
        out: List[Optional[torch.Tensor]] = [None] * (len(schema_args) + 1)
        for slot, pos in enumerate(tensor_pos):
            out[pos] = grads[slot] if needs[slot] and args[pos] is not None else None
        return tuple(out)

    forward_op.register_autograd(backward, setup_context=setup_context)
    return forward_op


def _custom_op(name: str) -> Callable:
    return getattr(torch.ops.spanbert_fast, name)


def _no_replayable_dropout(dropout_p: float) -> float:
    """The torch backend draws attention dropout from torch's global RNG, which the custom
    op's backward could not replay (it would use a different mask and give wrong
    gradients); ops.attention runs torch-backend dropout through plain autograd instead."""
    if dropout_p > 0.0:
        raise ValueError(
            "torch.ops.spanbert_fast.attention with backend 'torch' does not support "
            f"dropout_p > 0 (got {dropout_p}); call spanbert_fast.ops.attention instead")
    return dropout_p


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses are fp32, fp64 for fp64 inputs (the reference's log-sum-exp precision)."""
    return torch.promote_types(dtype, torch.float32)


def _scalar_fake(*args):
    return args[0].new_empty((), dtype=_loss_dtype(args[0].dtype))


_register_op(
    "attention",
    [("q", "Tensor"), ("k", "Tensor"), ("v", "Tensor"), ("key_padding_mask", "Tensor?"),
     ("cu_seqlens", "Tensor?"), ("max_seqlen", "int"), ("softmax_scale", "float"),
     ("dropout_p", "float")],
    lambda q, k, v, m, cu, ms, sc, p: reference.attention(
        q, k, v, m, cu, ms, sc, _no_replayable_dropout(p)),
    lambda q, *rest: q.new_empty(q.shape),
)
_register_op(
    "layer_norm",
    [("x", "Tensor"), ("weight", "Tensor"), ("bias", "Tensor"), ("eps", "float"),
     ("residual", "Tensor?")],
    reference.layer_norm,
    lambda x, weight, bias, eps, residual: x.new_empty(
        x.shape, dtype=x.dtype if residual is None else torch.promote_types(x.dtype,
                                                                           residual.dtype)),
)
_register_op(
    "bias_gelu",
    [("x", "Tensor"), ("bias", "Tensor")],
    reference.bias_gelu,
    lambda x, bias: x.new_empty(x.shape),
)
_register_op(
    "span_boundary_head",
    [("hidden", "Tensor"), ("left_index", "Tensor"), ("right_index", "Tensor"),
     ("rel_pos", "Tensor"), ("position_table", "Tensor"), ("w1", "Tensor"), ("b1", "Tensor"),
     ("ln1_weight", "Tensor"), ("ln1_bias", "Tensor"), ("w2", "Tensor"), ("b2", "Tensor"),
     ("ln2_weight", "Tensor"), ("ln2_bias", "Tensor"), ("eps", "float")],
    reference.span_boundary_head,
    lambda hidden, left, *rest: hidden.new_empty((left.shape[0], hidden.shape[1])),
)
_register_op(
    "linear_cross_entropy",
    [("hidden", "Tensor"), ("weight", "Tensor"), ("bias", "Tensor?"), ("labels", "Tensor"),
     ("ignore_index", "int")],
    reference.linear_cross_entropy,
    _scalar_fake,
)


def _is_right_padding(key_padding_mask: torch.Tensor) -> bool:
    """True when every row of the (batch, seq) bool mask is ones followed by zeros."""
    lengths = key_padding_mask.sum(dim=1)
    positions = torch.arange(key_padding_mask.shape[1], device=key_padding_mask.device)
    return bool(torch.equal(key_padding_mask, positions.unsqueeze(0) < lengths.unsqueeze(1)))


def _key_lengths_from_mask(key_padding_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(batch, seq) bool right-padding mask -> (batch,) int32 lengths; any other mask is
    refused (the kernel reads lengths, not the mask)."""
    if key_padding_mask is None:
        return None
    if not _mask_is_right_padded(key_padding_mask):
        raise ValueError(
            "key_padding_mask must be a right-padding mask (ones, then zeros) for the Triton "
            "attention kernel; this one has left padding or gaps. Use backend='torch', or the "
            "packed layout (cu_seqlens) that unpads any mask.")
    return key_padding_mask.sum(dim=1, dtype=torch.int32)


def _lse_shape(q: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: int):
    if cu_seqlens is not None:
        return (cu_seqlens.shape[0] - 1, q.shape[1], max_seqlen)
    return (q.shape[0], q.shape[1], q.shape[2])


@torch.library.custom_op("spanbert_fast::flash_attention_forward", mutates_args=())
def _flash_attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor], max_seqlen: int, softmax_scale: float,
    dropout_p: float, seed: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    return _kernel_module("attention").attention_forward(q, k, v, _key_lengths_from_mask(key_padding_mask), cu_seqlens, max_seqlen,
                   softmax_scale, dropout_p, int(seed.item()))


@_flash_attention_forward.register_fake
def _(q, k, v, key_padding_mask, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed):
    return (q.new_empty(q.shape),
            q.new_empty(_lse_shape(q, cu_seqlens, max_seqlen), dtype=torch.float32))


@torch.library.custom_op("spanbert_fast::flash_attention_backward", mutates_args=())
def _flash_attention_backward(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor], max_seqlen: int, softmax_scale: float,
    dropout_p: float, seed: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _kernel_module("attention").attention_backward(dout, q, k, v, out, lse, _key_lengths_from_mask(key_padding_mask),
                    cu_seqlens, max_seqlen, softmax_scale, dropout_p, int(seed.item()))


@_flash_attention_backward.register_fake
def _(dout, q, k, v, out, lse, key_padding_mask, cu_seqlens, max_seqlen, softmax_scale,
      dropout_p, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _flash_attention_setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, cu_seqlens, max_seqlen, softmax_scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, cu_seqlens, seed)
    ctx.scalars = (max_seqlen, softmax_scale, dropout_p)


def _flash_attention_autograd(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, cu_seqlens, seed = ctx.saved_tensors
    max_seqlen, softmax_scale, dropout_p = ctx.scalars
    with _checks_state(right_padded=True):  # its forward verified the mask (or raised)
        dq, dk, dv = _flash_attention_backward(grad_out.contiguous(), q, k, v, out, lse,
                                               key_padding_mask, cu_seqlens, max_seqlen,
                                               softmax_scale, dropout_p, seed)
    return dq, dk, dv, None, None, None, None, None, None


_flash_attention_forward.register_autograd(_flash_attention_autograd,
                                           setup_context=_flash_attention_setup_context)


@torch.library.custom_op("spanbert_fast::fused_linear_cross_entropy", mutates_args=())
def _fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    labels: torch.Tensor, ignore_index: int, need_grads: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, d loss/d hidden, d loss/d weight, d loss/d bias); empty grads when not needed."""
    with _without_autocast(hidden):
        loss, grad_hidden, grad_weight, grad_bias = _kernel_module(
            "linear_cross_entropy").linear_cross_entropy_forward(hidden, weight, bias, labels,
                                                                 ignore_index, need_grads)
    # Distinct empty tensors: a custom op may not return one tensor twice (aliasing).
    return (loss, grad_hidden if grad_hidden is not None else hidden.new_empty(0),
            grad_weight if grad_weight is not None else hidden.new_empty(0),
            grad_bias if grad_bias is not None else hidden.new_empty(0))


@_fused_linear_cross_entropy.register_fake
def _(hidden, weight, bias, labels, ignore_index, need_grads):
    loss = hidden.new_empty((), dtype=_loss_dtype(hidden.dtype))
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


def _run(name: str, backend: str, tensors: Sequence[torch.Tensor], args: tuple):
    chosen = resolve_backend(backend, name, [t for t in tensors if t is not None])
    if chosen == "torch":
        # Plain autograd through the reference; torch.compile traces it directly.
        return getattr(reference, name)(*args)
    if name in _AUTOCAST_MATMUL_OPS:
        args = _autocast_matmul_inputs(args)
    return _custom_op(name)(*args, chosen)


# --------------------------------------------------------------------------------------
# Public ops
# --------------------------------------------------------------------------------------
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_padding_mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    max_seqlen: Optional[int] = None,
    softmax_scale: Optional[float] = None,
    dropout_p: float = 0.0,
    attn_bias: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Bidirectional multi-head attention.

    Padded layout: ``q``, ``k``, ``v`` of shape ``(batch, heads, seq, head_dim)`` and an
    optional ``key_padding_mask`` ``(batch, seq)`` (bool or 0/1 ints; True/1 = attend).
    Packed layout: ``q``, ``k``, ``v`` of shape ``(total_tokens, heads, head_dim)`` with
    ``cu_seqlens`` ``(batch + 1,)`` int32 (0, len0, len0+len1, ...) and ``max_seqlen``.
    ``softmax_scale`` defaults to ``1/sqrt(head_dim)``. ``dropout_p`` in ``[0, 1)`` drops
    attention probabilities. ``attn_bias``: an arbitrary additive float mask (padded layout),
    always run by the torch backend. Returns a tensor shaped like ``q``; query rows with no
    valid key are zeros.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, dtypes=_FLOAT_DTYPES)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    _check_same_device(q=q, k=k, v=v, key_padding_mask=key_padding_mask,
                       cu_seqlens=cu_seqlens, attn_bias=attn_bias)
    if cu_seqlens is not None:
        if key_padding_mask is not None or attn_bias is not None:
            raise ValueError("cu_seqlens (packed layout) cannot be combined with "
                             "key_padding_mask or attn_bias")
        if q.dim() != 3:
            raise ValueError("packed layout: q must be 3-D (total_tokens, heads, head_dim), "
                             f"got shape {tuple(q.shape)}")
        _check_shape("k", k, q.shape)
        _check_shape("v", v, q.shape)
        _check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
        if cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must hold at least 2 entries (batch + 1), "
                             f"got {cu_seqlens.numel()}")
        if max_seqlen is None or int(max_seqlen) < 0:
            raise ValueError(f"max_seqlen must be a non-negative int with cu_seqlens, got {max_seqlen!r}")
        if _value_checks_on():
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != q.shape[0]:
                raise ValueError(
                    f"cu_seqlens must start at 0 and end at total_tokens={q.shape[0]}, "
                    f"got {int(cu_seqlens[0])} .. {int(cu_seqlens[-1])}")
            if bool((lengths < 0).any()) or int(lengths.max()) > int(max_seqlen):
                raise ValueError(
                    f"cu_seqlens must be non-decreasing with lengths <= max_seqlen={max_seqlen}, "
                    f"got lengths {lengths.tolist()[:16]}")
        scale = _resolve_scale(softmax_scale, q.shape[-1])
        return _run_attention(backend, (q, k, v, None, cu_seqlens, int(max_seqlen), scale,
                                         float(dropout_p)))

    if q.dim() != 4:
        raise ValueError("padded layout: q must be 4-D (batch, heads, seq, head_dim), "
                         f"got shape {tuple(q.shape)}")
    _check_shape("k", k, q.shape)
    _check_shape("v", v, q.shape)
    batch, _, seq, _ = q.shape
    if key_padding_mask is not None:
        _check_tensor("key_padding_mask", key_padding_mask, ndim=2)
        _check_shape("key_padding_mask", key_padding_mask, (batch, seq))
        if key_padding_mask.dtype != torch.bool:
            if key_padding_mask.is_floating_point():
                raise TypeError("key_padding_mask must be bool or integer 0/1 (True = attend), "
                                f"got {key_padding_mask.dtype}; pass an additive mask as attn_bias")
            key_padding_mask = key_padding_mask != 0
    scale = _resolve_scale(softmax_scale, q.shape[-1])
    if attn_bias is not None:
        _check_tensor("attn_bias", attn_bias, dtypes=_FLOAT_DTYPES)
        try:
            torch.broadcast_shapes(attn_bias.shape, (batch, q.shape[1], seq, seq))
        except RuntimeError:
            raise ValueError(f"attn_bias must broadcast to {(batch, q.shape[1], seq, seq)}, "
                             f"got {tuple(attn_bias.shape)}") from None
        _warn_once("attn_bias", "attention with an arbitrary additive attn_bias runs on the "
                   "torch reference (the fused kernel reads only padding lengths)")
        return reference.attention(q, k, v, key_padding_mask, None, 0, scale, float(dropout_p),
                                   attn_bias=attn_bias)
    return _run_attention(backend, (q, k, v, key_padding_mask, None, 0, scale, float(dropout_p)))


def _run_attention(backend: str, args: tuple) -> torch.Tensor:
    """Attention's dispatch: the Triton path goes through the flash-attention custom ops
    (forward saves lse); the torch path is :mod:`spanbert_fast.torch_backend`. A padded
    mask the kernel cannot read (not right padding) is refused under an explicit
    "triton" and falls back to torch under "auto"."""
    q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, dropout_p = args
    tensors = [t for t in (q, k, v, key_padding_mask, cu_seqlens) if t is not None]
    chosen = resolve_backend(backend, "attention", tensors)
    if chosen == "triton" and key_padding_mask is not None and _values_checkable() \
            and not _mask_is_right_padded(key_padding_mask):
        # The padded kernel reads key lengths, so only right padding; the packed layout
        # (cu_seqlens, what the models run) takes any mask. Never a silent substitution:
        # an explicit "triton" (argument or SPANBERT_FAST_BACKEND) is refused.
        reason = ("key_padding_mask is not right padding (ones then zeros), and the padded "
                  "Triton kernel reads key lengths; unpad to the packed layout (cu_seqlens) "
                  "or right-pad")
        if _explicit_backend(backend) == "triton":
            raise BackendUnavailableError(
                f"backend 'triton' cannot run attention on inputs [{_describe(tensors)}]:\n"
                f"  - {reason}\nUse backend='torch' (or 'auto').")
        _warn_once("left_padding", f"attention: {reason}; running the torch backend")
        chosen = "torch"
    if chosen == "torch":
        # The fast torch backend (SDPA), not the oracle: reference.attention is what
        # tests compare both backends against.
        return torch_backend.attention(*args)
    # The dropout seed is drawn from torch's CPU generator: torch.manual_seed makes it
    # reproducible, and the backward replays the same mask from it.
    seed = (torch.randint(0, 2**31 - 1, (1,)) if dropout_p > 0.0
            else torch.zeros(1, dtype=torch.int64))
    out, _ = _flash_attention_forward(q, k, v, key_padding_mask, cu_seqlens, max_seqlen,
                                      scale, dropout_p, seed)
    return out


def _resolve_scale(softmax_scale: Optional[float], head_dim: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    scale = float(softmax_scale)
    if not math.isfinite(scale) or scale <= 0.0:
        raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale!r}")
    return scale


_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


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
    _check_tensor("x", x, dtypes=_FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., hidden), got a scalar")
    hidden = x.shape[-1]
    _check_tensor("weight", weight, ndim=1, dtypes=_FLOAT_DTYPES)
    _check_tensor("bias", bias, ndim=1, dtypes=_FLOAT_DTYPES)
    _check_shape("weight", weight, (hidden,))
    _check_shape("bias", bias, (hidden,))
    if residual is not None:
        _check_tensor("residual", residual, dtypes=_FLOAT_DTYPES)
        _check_shape("residual", residual, x.shape)
    if not (float(eps) > 0.0):
        raise ValueError(f"eps must be > 0, got {eps!r}")
    _check_same_device(x=x, weight=weight, bias=bias, residual=residual)
    return _run("layer_norm", backend, [x, weight, bias, residual],
                (x, weight, bias, float(eps), residual))


def bias_gelu(x: torch.Tensor, bias: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Exact erf ``GELU(x + bias)``; ``x``: ``(..., features)``, ``bias``: ``(features,)``."""
    _check_tensor("x", x, dtypes=_FLOAT_DTYPES)
    _check_tensor("bias", bias, ndim=1, dtypes=_FLOAT_DTYPES)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., features), got a scalar")
    _check_shape("bias", bias, (x.shape[-1],))
    _check_same_device(x=x, bias=bias)
    return _run("bias_gelu", backend, [x, bias], (x, bias))


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
    """The SBO MLP over gathered span boundaries (see :func:`reference.span_boundary_head`).

    ``hidden``: ``(tokens, H)``; ``left_index``, ``right_index``, ``rel_pos``: ``(N,)``
    int64; ``position_table``: ``(P, E)``; ``w1``: ``(H, 2H + E)``; ``w2``: ``(H, H)``.
    Returns ``(N, H)``.
    """
    _check_tensor("hidden", hidden, ndim=2, dtypes=_FLOAT_DTYPES)
    tokens, width = hidden.shape
    for name, t in (("left_index", left_index), ("right_index", right_index), ("rel_pos", rel_pos)):
        _check_tensor(name, t, ndim=1, dtypes=(torch.int64,))
    n = left_index.shape[0]
    _check_shape("right_index", right_index, (n,))
    _check_shape("rel_pos", rel_pos, (n,))
    _check_tensor("position_table", position_table, ndim=2, dtypes=_FLOAT_DTYPES)
    rows, pos_width = position_table.shape
    _check_tensor("w1", w1, ndim=2, dtypes=_FLOAT_DTYPES)
    _check_shape("w1", w1, (width, 2 * width + pos_width))
    _check_tensor("w2", w2, ndim=2, dtypes=_FLOAT_DTYPES)
    _check_shape("w2", w2, (width, width))
    for name, t in (("b1", b1), ("ln1_weight", ln1_weight), ("ln1_bias", ln1_bias),
                    ("b2", b2), ("ln2_weight", ln2_weight), ("ln2_bias", ln2_bias)):
        _check_tensor(name, t, ndim=1, dtypes=_FLOAT_DTYPES)
        _check_shape(name, t, (width,))
    floats = dict(hidden=hidden, position_table=position_table, w1=w1, b1=b1,
                  ln1_weight=ln1_weight, ln1_bias=ln1_bias, w2=w2, b2=b2,
                  ln2_weight=ln2_weight, ln2_bias=ln2_bias)
    _check_same_device(left_index=left_index, right_index=right_index, rel_pos=rel_pos,
                       **floats)
    _check_matmul_dtypes(**floats)
    _check_index_range("left_index", left_index, 0, tokens)
    _check_index_range("right_index", right_index, 0, tokens)
    _check_index_range("rel_pos", rel_pos, 0, rows)
    args = (hidden, left_index, right_index, rel_pos, position_table, w1, b1, ln1_weight,
            ln1_bias, w2, b2, ln2_weight, ln2_bias, float(eps))
    return _run("span_boundary_head", backend, [hidden, position_table, w1, w2], args)


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
    _check_tensor("hidden", hidden, ndim=2, dtypes=_FLOAT_DTYPES)
    _check_tensor("weight", weight, ndim=2, dtypes=_FLOAT_DTYPES)
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape (vocab, {hidden.shape[1]}), got {tuple(weight.shape)}")
    if bias is not None:
        _check_tensor("bias", bias, ndim=1, dtypes=_FLOAT_DTYPES)
        _check_shape("bias", bias, (weight.shape[0],))
    _check_tensor("labels", labels, ndim=1, dtypes=(torch.int64,))
    _check_shape("labels", labels, (hidden.shape[0],))
    _check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    _check_matmul_dtypes(hidden=hidden, weight=weight, bias=bias)
    if labels.numel() and _value_checks_on():
        valid = labels[labels != ignore_index]
        _check_index_range("labels", valid, 0, weight.shape[0])
    chosen = resolve_backend(backend, "linear_cross_entropy",
                             [t for t in (hidden, weight, bias, labels) if t is not None])
    if chosen == "torch":
        return reference.linear_cross_entropy(hidden, weight, bias, labels, int(ignore_index))
    hidden, weight, bias = _autocast_matmul_inputs((hidden, weight, bias))
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
        return _custom_op("linear_cross_entropy")(hidden, weight, bias, labels,
                                                  int(ignore_index), chosen)
    return _fused_linear_cross_entropy(hidden, weight, bias, labels, int(ignore_index),
                                       need_grads)[0]
