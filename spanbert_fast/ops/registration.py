"""How the ops become ``torch.ops.spanbert_fast.<name>``.

``register_op(name, ...)``: one generic registration for ops whose backward needs only
their inputs (bias_gelu, and the loss-scaled fp16 path of linear_cross_entropy). It
defines ``torch.ops.spanbert_fast.<name>`` and ``<name>_backward``, both taking the backend
name as their last argument. The ``torch`` backend runs the reference (the oracle) and
differentiates it with ``torch.func.vjp``; ``triton`` calls the kernel file's generic
launchers ``forward(*op_args)`` and ``backward(grad_output, *op_args, needs_input_grad)``.

Ops whose backward reuses forward results register dedicated custom ops in their own
module: attention (its log-sum-exp), layer_norm (row mean and rstd) and span_boundary_head
(its GEMM outputs and LayerNorm statistics). ``register_composite(name, ...)`` gives the
last two their ``torch.ops.spanbert_fast.<name>(..., backend)`` as well: a
CompositeImplicitAutograd op that calls the reference or the public function, so autograd
runs through the reference or the dedicated ops and nothing is recomputed.
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from . import checks, dispatch


def tensor_positions(schema_args: Sequence[Tuple[str, str]]) -> List[int]:
    return [i for i, (_, kind) in enumerate(schema_args) if kind.startswith("Tensor")]


def register_op(name: str, schema_args: Sequence[Tuple[str, str]], reference_fn: Callable,
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
    tensor_pos = tensor_positions(schema_args)

    def forward_impl(*args):
        *op_args, backend = args
        if backend == "torch":
            with torch.no_grad():
                return reference_fn(*op_args).contiguous()
        if "forward" not in dispatch.KERNEL_ENTRY_POINTS[name]:
            raise ValueError(f"torch.ops.spanbert_fast.{name} runs backend 'torch' only; its "
                             "Triton kernel has a dedicated op (use spanbert_fast.ops."
                             f"{name}, which picks it)")
        with dispatch.without_autocast(op_args[0]):
            return dispatch.kernel_module(name).forward(
                *op_args, check_arguments=not checks.arguments_checked_upstream())

    def backward_impl(grad_output, *args):
        *op_args, needs, backend = args
        if backend != "torch":
            with dispatch.without_autocast(grad_output):
                return dispatch.kernel_module(name).backward(
                    grad_output, *op_args, needs,
                    check_arguments=not checks.arguments_checked_upstream())
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
        # Whether the forward ran inside values_checked() (the models' one batched check):
        # the backward runs after that block, on the autograd thread on CUDA, so it
        # re-enters it rather than reading the values again (a host sync).
        ctx.values_done = not checks.value_checks_on() and checks.values_checkable()

    def backward(ctx, grad_output):
        saved = iter(ctx.saved_tensors)
        args = [next(saved) if a is None and p in tensor_pos else a
                for p, a in enumerate(ctx.scalars)]
        backend = args.pop()
        needs = [bool(ctx.needs_input_grad[p]) for p in tensor_pos]
        values = checks.values_checked() if ctx.values_done else contextlib.nullcontext()
        with checks.arguments_checked(), values:  # the forward's arguments, checked then
            grads = backward_op(grad_output.contiguous(), *args, needs, backend)
        out: List[Optional[torch.Tensor]] = [None] * (len(schema_args) + 1)
        for slot, pos in enumerate(tensor_pos):
            out[pos] = grads[slot] if needs[slot] and args[pos] is not None else None
        return tuple(out)

    forward_op.register_autograd(backward, setup_context=setup_context)
    return forward_op


_LIBRARY = torch.library.Library("spanbert_fast", "FRAGMENT")


def register_composite(name: str, schema_args: Sequence[Tuple[str, str]],
                       reference_fn: Callable, public_fn: Callable) -> None:
    """Register ``spanbert_fast::<name>(<schema_args>, str backend) -> Tensor`` as a
    CompositeImplicitAutograd op: backend ``torch`` runs ``reference_fn(*args)`` (as the
    generic ops do: no argument checks, whose value checks would read data a trace cannot
    give), any other ``public_fn(*args, backend)``: the public op (argument checks,
    backend choice, its dedicated custom ops and their autograd). It has no autograd or
    fake of its own: autograd and ``torch.compile`` see what it calls.
    """
    arg_list = ", ".join(f"{kind} {arg}" for arg, kind in schema_args)
    _LIBRARY.define(f"{name}({arg_list}, str backend) -> Tensor")

    def impl(*args):
        *op_args, backend = args
        if backend == "torch":
            return reference_fn(*op_args)
        return public_fn(*op_args, backend)

    _LIBRARY.impl(name, impl, "CompositeImplicitAutograd")


def custom_op(name: str) -> Callable:
    """``torch.ops.spanbert_fast.<name>``."""
    return getattr(torch.ops.spanbert_fast, name)


def loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """Losses are fp32, fp64 for fp64 inputs (the reference's log-sum-exp precision)."""
    return torch.promote_types(dtype, torch.float32)


def run(name: str, backend: str, tensors: Sequence[Optional[torch.Tensor]], args: tuple,
        reference_fn: Callable):
    """Dispatch a generically registered op: ``torch`` runs ``reference_fn`` under plain
    autograd (torch.compile traces it directly), ``triton`` the custom op."""
    chosen = dispatch.resolve_backend(backend, name, [t for t in tensors if t is not None])
    if chosen == "torch":
        return reference_fn(*args)
    with checks.arguments_checked():
        return custom_op(name)(*args, chosen)
