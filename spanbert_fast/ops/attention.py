"""``attention``: bidirectional multi-head attention, padded or packed (varlen).

The Triton path is the flash-attention kernel pair, reached through dedicated custom ops:
the forward returns the log-sum-exp the backward needs, and the backward replays the
dropout mask from the forward's seed. The torch path is :mod:`.torch_backend` (SDPA);
:func:`.reference.attention` is the oracle both are tested against, and the registered
``torch.ops.spanbert_fast.attention`` runs it.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from . import checks, dispatch, reference, torch_backend
from .checks import (FLOAT_DTYPES, check_same_device, check_shape, check_tensor,
                     checks_state, mask_is_right_padded, value_checks_on)
from .registration import register_op


def _no_replayable_dropout(dropout_p: float) -> float:
    """The torch backend draws attention dropout from torch's global RNG, which the custom
    op's backward could not replay (it would use a different mask and give wrong
    gradients); ops.attention runs torch-backend dropout through plain autograd instead."""
    if dropout_p > 0.0:
        raise ValueError(
            "torch.ops.spanbert_fast.attention with backend 'torch' does not support "
            f"dropout_p > 0 (got {dropout_p}); call spanbert_fast.ops.attention instead")
    return dropout_p


register_op(
    "attention",
    [("q", "Tensor"), ("k", "Tensor"), ("v", "Tensor"), ("key_padding_mask", "Tensor?"),
     ("cu_seqlens", "Tensor?"), ("max_seqlen", "int"), ("softmax_scale", "float"),
     ("dropout_p", "float")],
    lambda q, k, v, m, cu, ms, sc, p: reference.attention(
        q, k, v, m, cu, ms, sc, _no_replayable_dropout(p)),
    lambda q, *rest: q.new_empty(q.shape),
)

def _key_lengths_from_mask(key_padding_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(batch, seq) bool right-padding mask -> (batch,) int32 lengths; any other mask is
    refused (the kernel reads lengths, not the mask)."""
    if key_padding_mask is None:
        return None
    if not mask_is_right_padded(key_padding_mask):
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
    return dispatch.kernel_module("attention").attention_forward(
        q, k, v, _key_lengths_from_mask(key_padding_mask), cu_seqlens, max_seqlen,
        softmax_scale, dropout_p, int(seed.item()),
        check_arguments=not checks.arguments_checked_upstream())


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
    return dispatch.kernel_module("attention").attention_backward(
        dout, q, k, v, out, lse, _key_lengths_from_mask(key_padding_mask), cu_seqlens,
        max_seqlen, softmax_scale, dropout_p, int(seed.item()),
        check_arguments=not checks.arguments_checked_upstream())


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
    # Its forward verified the mask (or raised) and its arguments.
    with checks_state(right_padded=True, arguments_done=True):
        dq, dk, dv = _flash_attention_backward(grad_out.contiguous(), q, k, v, out, lse,
                                               key_padding_mask, cu_seqlens, max_seqlen,
                                               softmax_scale, dropout_p, seed)
    return dq, dk, dv, None, None, None, None, None, None


_flash_attention_forward.register_autograd(_flash_attention_autograd,
                                           setup_context=_flash_attention_setup_context)


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
        check_tensor(name, t, dtypes=FLOAT_DTYPES)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    check_same_device(q=q, k=k, v=v, key_padding_mask=key_padding_mask,
                       cu_seqlens=cu_seqlens, attn_bias=attn_bias)
    if cu_seqlens is not None:
        if key_padding_mask is not None or attn_bias is not None:
            raise ValueError("cu_seqlens (packed layout) cannot be combined with "
                             "key_padding_mask or attn_bias")
        if q.dim() != 3:
            raise ValueError("packed layout: q must be 3-D (total_tokens, heads, head_dim), "
                             f"got shape {tuple(q.shape)}")
        check_shape("k", k, q.shape)
        check_shape("v", v, q.shape)
        check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32, torch.int64))
        if cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must hold at least 2 entries (batch + 1), "
                             f"got {cu_seqlens.numel()}")
        if max_seqlen is None or int(max_seqlen) < 0:
            raise ValueError(f"max_seqlen must be a non-negative int with cu_seqlens, got {max_seqlen!r}")
        if value_checks_on():
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
    check_shape("k", k, q.shape)
    check_shape("v", v, q.shape)
    batch, _, seq, _ = q.shape
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2)
        check_shape("key_padding_mask", key_padding_mask, (batch, seq))
        if key_padding_mask.dtype != torch.bool:
            if key_padding_mask.is_floating_point():
                raise TypeError("key_padding_mask must be bool or integer 0/1 (True = attend), "
                                f"got {key_padding_mask.dtype}; pass an additive mask as attn_bias")
            key_padding_mask = key_padding_mask != 0
    scale = _resolve_scale(softmax_scale, q.shape[-1])
    if attn_bias is not None:
        check_tensor("attn_bias", attn_bias, dtypes=FLOAT_DTYPES)
        try:
            torch.broadcast_shapes(attn_bias.shape, (batch, q.shape[1], seq, seq))
        except RuntimeError:
            raise ValueError(f"attn_bias must broadcast to {(batch, q.shape[1], seq, seq)}, "
                             f"got {tuple(attn_bias.shape)}") from None
        dispatch.warn_once("attn_bias", "attention with an arbitrary additive attn_bias runs on the "
                   "torch reference (the fused kernel reads only padding lengths)")
        return reference.attention(q, k, v, key_padding_mask, None, 0, scale, float(dropout_p),
                                   attn_bias=attn_bias)
    return _run_attention(backend, (q, k, v, key_padding_mask, None, 0, scale, float(dropout_p)))


def _run_attention(backend: str, args: tuple) -> torch.Tensor:
    """Attention's dispatch: the Triton path goes through the flash-attention custom ops
    (forward saves lse); the torch path is :mod:`spanbert_fast.ops.torch_backend`. A padded
    mask the kernel cannot read (not right padding) is refused under an explicit
    "triton" and falls back to torch under "auto"."""
    q, k, v, key_padding_mask, cu_seqlens, max_seqlen, scale, dropout_p = args
    tensors = [t for t in (q, k, v, key_padding_mask, cu_seqlens) if t is not None]
    chosen = dispatch.resolve_backend(backend, "attention", tensors)
    if chosen == "triton" and key_padding_mask is not None and checks.values_checkable() \
            and not mask_is_right_padded(key_padding_mask):
        # The padded kernel reads key lengths, so only right padding; the packed layout
        # (cu_seqlens, what the models run) takes any mask. Never a silent substitution:
        # an explicit "triton" (argument or SPANBERT_FAST_BACKEND) is refused.
        reason = ("key_padding_mask is not right padding (ones then zeros), and the padded "
                  "Triton kernel reads key lengths; unpad to the packed layout (cu_seqlens) "
                  "or right-pad")
        if dispatch.explicit_backend(backend) == "triton":
            raise dispatch.refuse("attention", tensors, [reason])
        dispatch.warn_once("left_padding", f"attention: {reason}; running the torch backend")
        chosen = "torch"
    if chosen == "torch":
        # The fast torch backend (SDPA), not the oracle: reference.attention is what
        # tests compare both backends against.
        return torch_backend.attention(*args)
    # The dropout seed is drawn from torch's CPU generator: torch.manual_seed makes it
    # reproducible, and the backward replays the same mask from it.
    seed = (torch.randint(0, 2**31 - 1, (1,)) if dropout_p > 0.0
            else torch.zeros(1, dtype=torch.int64))
    with checks.arguments_checked():
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
