"""Fused linear cross-entropy that never holds the full ``(rows x vocab)`` logits, in Triton.

``loss = mean over labels != ignore_index of CE(hidden @ weight.T + bias, label)``, the
op of :func:`spanbert_fast.ops.reference.linear_cross_entropy` (0.0 when no label is valid;
log-sum-exp in fp32, fp64 for fp64 inputs). SpanBERT calls it twice per step, for the MLM
rows and the SBO targets, with ``weight`` the tied word embeddings (28996 x 768/1024).

How it runs
-----------
The rows are processed in chunks small enough that one chunk's logits fit
``chunk_bytes`` (256 MiB by default): at 28996 words that is 4608 fp16/bf16 or 2304 fp32
rows (rounded down to a multiple of 128), so a full (16384 x 28996) fp32 logits tensor
(1.9 GB) never exists, and peak memory stays bounded whatever the number of rows. Per
chunk:

1. ``logits = h_chunk @ W.T + b`` on cuBLAS (``torch.addmm`` into one reused buffer, in
   the input dtype: fp16/bf16 logits halve the buffer, and the softmax statistics are
   taken in fp32 anyway).
2. :func:`_cross_entropy_rows_kernel`, one program per row, walks the vocabulary in
   ``BLOCK_V`` blocks with an online log-sum-exp (running max and sum in fp32) and reads
   the label's logit: ``loss_row = lse - logit[label]``. With gradients wanted, a second
   walk overwrites the row IN PLACE with ``d loss / d logits = (softmax - onehot) / n_valid``
   (ignored rows get zeros), so the gradient needs no second ``(chunk x V)`` buffer.
3. ``grad_hidden_chunk = dlogits @ W``, ``grad_weight += dlogits.T @ h_chunk``,
   ``grad_bias += dlogits.sum(0)`` (cuBLAS; the weight and bias sums accumulate in fp32
   across chunks and are cast back at the end).

The gradients are thus computed during the forward (the trick of Liger-Kernel's fused
linear cross-entropy): the logits are produced once and read twice by the kernel, instead
of being kept for a backward that would recompute or store them; a backward that kept
them only scales them by the upstream scalar. The generic :func:`backward` below instead
recomputes the whole loop with the upstream scalar folded into ``dlogits`` (no saved
``(V x H)`` gradient between forward and backward, one more pass of GEMMs).

Precision: fp32 inputs run fp32 GEMMs (cuBLAS does not use TF32 unless
``torch.backends.cuda.matmul.allow_tf32`` is set) and fp32 statistics. Measured against an
fp64 oracle in the interpreter: <= 1e-6 at 1000 words; 7e-6 for grad_hidden at 28996
words, all from the fp32 GEMM ``dlogits @ W`` over K = 28996 (the kernel's dlogits alone:
2e-7; torch's fp32 error on the same inputs: 7e-6). fp16/bf16 inputs round the logits
and ``dlogits`` to the input dtype, as the plain-torch
``F.cross_entropy(F.linear(h, W, b).float(), labels)`` does (measured: the same error as
that baseline to two digits); fp16 ``softmax * grad_scale / n_valid`` values below 6e-8
underflow in both. Caveat for fp16 with a loss scaler: a backward that only rescales
gradients computed in the forward (grad scale 1) cannot undo that underflow; the
recomputing :func:`backward` folds the (scaled) upstream gradient into ``dlogits`` and
can. bf16 has fp32's exponent range and is unaffected.

Entry points:

* :func:`linear_cross_entropy_forward` ``(hidden, weight, bias, labels, ignore_index,
  need_grads, chunk_bytes) -> (loss, grad_hidden, grad_weight, grad_bias)``
* :func:`forward` / :func:`backward`: the generic op-registry convention of
  ``spanbert_fast.ops`` (``backward`` recomputes through the launcher above).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ._common import INTERPRET as _INTERPRET
from ._common import (accumulator_dtype, check_float_tensor, empty_buffer, needs_flags,
                      value_checks_enabled)

__all__ = ["linear_cross_entropy_forward", "forward", "backward", "DEFAULT_CHUNK_BYTES",
           "not_supported_reasons"]


# Logits budget per chunk. 256 MiB holds every SpanBERT MLM batch up to ~4.6K masked rows
# (bf16, 28996 words) in a single chunk, so chunking costs nothing at usual sizes while a
# 64K-row batch still never allocates more than this for logits.
DEFAULT_CHUNK_BYTES = 256 * 2**20

# Vocabulary block of one kernel step. GPU: 4096 fp32 per program step with 8 warps is
# 16 elements per thread (vectorised 16-byte loads); 28996 words take 8 steps per pass.
# A starting point, not yet measured on a GPU. Interpreter: 512, so a 1000-word vocabulary
# already spans two blocks with a partial last one. Measured in the interpreter (2-core
# CPU) on 4 rows x 28996 words with gradients: 512 took 1.2 s, 2048 0.4 s, 4096 0.26 s;
# the interpreter's cost is per block step, and 512 keeps the multi-block path tested on
# the small vocabularies where most test rows are.
_GPU_BLOCK_V = 4096
_GPU_NUM_WARPS = 8
_INTERPRET_BLOCK_V = 512

# Testing hook: when True, every buffer the launcher allocates and the kernel or a GEMM
# must overwrite (per-row losses, grad_hidden, fp32 grad_weight, logits) is filled with
# NaN first, so an element left unwritten shows up as NaN. Tests switch it on with
# monkeypatch; it costs a fill per buffer.
POISON_BUFFERS = False


def _empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return empty_buffer(shape, dtype, device, POISON_BUFFERS)


@triton.jit
def _cross_entropy_rows_kernel(
    LOGITS, LABELS, LOSS, GRAD_SCALE,
    n_cols, ignore_index, n_valid,
    stride_logits_row,
    COMPUTE_GRAD: tl.constexpr, ACC_DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One program per row: the row's cross-entropy and, if COMPUTE_GRAD, its gradient.

    LOGITS: (rows, n_cols) fp16/bf16/fp32/fp64, unit column stride; overwritten in place
    with ``(softmax - onehot(label)) / n_valid`` when COMPUTE_GRAD (zeros for ignored rows).
    LABELS: (rows,) int64, ``ignore_index`` or a column in [0, n_cols) (checked by the
    launcher; anything else is treated as ignored, never read out of bounds).
    LOSS: (rows,) ACC_DTYPE, ``lse - logit[label]`` (0 for ignored rows).
    n_valid: number of valid labels over ALL chunks (the mean's denominator), >= 1.
    GRAD_SCALE: (1,) ACC_DTYPE, the upstream gradient of the loss (1 in the forward), read
    only if COMPUTE_GRAD: folding it in here spares the backward a pass over every gradient
    and never rounds it to fp16/bf16 on its own.
    """
    row = tl.program_id(0).to(tl.int64)  # int64: rows * stride passes 2**31 at 74K rows
    row_ptr = LOGITS + row * stride_logits_row
    label = tl.load(LABELS + row)
    valid = (label != ignore_index) & (label >= 0) & (label < n_cols)
    cols = tl.arange(0, BLOCK_V)

    # Pass 1: online log-sum-exp. One block max and one exp per element; the running sum
    # is rescaled by exp(m_old - m_new) whenever the max grows. The first block always
    # holds a real logit, so m is finite from then on (unless the logits are -inf).
    m = tl.full([], float("-inf"), ACC_DTYPE)
    s = tl.full([], 0.0, ACC_DTYPE)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        x = tl.load(row_ptr + offs, mask=offs < n_cols, other=float("-inf")).to(ACC_DTYPE)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    safe_label = tl.where(valid, label, 0)
    target = tl.load(row_ptr + safe_label).to(ACC_DTYPE)
    tl.store(LOSS + row, tl.where(valid, lse - target, 0.0))

    if COMPUTE_GRAD:
        # Pass 2: the gradient of the mean loss w.r.t. this row's logits, written over the
        # logits it is computed from (each element is read before it is written, and a
        # program only touches its own row).
        scale = tl.load(GRAD_SCALE).to(ACC_DTYPE) / tl.full([], n_valid, ACC_DTYPE)
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            in_row = offs < n_cols
            x = tl.load(row_ptr + offs, mask=in_row, other=0.0).to(ACC_DTYPE)
            g = tl.exp(x - lse)
            g = tl.where(offs == label, g - 1.0, g) * scale
            g = tl.where(valid, g, 0.0)  # where, not * 0: an ignored row may hold inf
            tl.store(row_ptr + offs, g.to(LOGITS.dtype.element_ty), mask=in_row)


# --------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------
def _check_inputs(hidden, weight, bias, labels, ignore_index, chunk_bytes) -> None:
    check_float_tensor("hidden", hidden, ndim=2)
    check_float_tensor("weight", weight, ndim=2)
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if weight.dtype != hidden.dtype and not _autocast_layout(hidden.dtype, weight.dtype):
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype} (one GEMM dtype), "
                        f"or be float32 with float16/bfloat16 hidden (autocast's fp32 "
                        f"weights), got {weight.dtype}")
    if weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"weight must have shape (vocab, {hidden.shape[1]}), "
                         f"got {tuple(weight.shape)}")
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have at least one row (vocab >= 1), "
                         f"got shape {tuple(weight.shape)}")
    if bias is not None:
        check_float_tensor("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), "
                             f"got {tuple(bias.shape)}")
    if labels.dtype != torch.int64:
        raise TypeError(f"labels must be int64, got {labels.dtype}")
    if tuple(labels.shape) != (hidden.shape[0],):
        raise ValueError(f"labels must have shape ({hidden.shape[0]},), "
                         f"got {tuple(labels.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    devices = {t.device for t in (hidden, weight, bias, labels) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"hidden, weight, bias and labels must be on one device, got "
                         f"{sorted(str(d) for d in devices)}")


def _autocast_layout(hidden_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
    """fp16/bf16 activations with fp32 weights: what the model hands the op under
    ``torch.autocast``, which never casts the arguments of a custom op. The GEMMs then run
    in hidden's dtype on a cast copy of the weight, as autocast's ``F.linear`` would."""
    return hidden_dtype in (torch.float16, torch.bfloat16) and weight_dtype == torch.float32


def _count_valid_labels(labels: torch.Tensor, ignore_index: int, vocab: int) -> int:
    """Number of labels != ignore_index; raises ValueError if one lies outside [0, vocab).

    One host sync for both numbers (the count scales every gradient element, the range
    check keeps the kernel's label read in bounds)."""
    if labels.numel() == 0:
        return 0
    valid = labels != ignore_index
    bad = valid & ((labels < 0) | (labels >= vocab))
    n_valid, n_bad = torch.stack([valid.sum(), bad.sum()]).tolist()
    if n_bad:
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index="
                         f"{ignore_index}; {n_bad} do not, first labels[{first}] = "
                         f"{int(labels[first])}")
    return int(n_valid)


def _rows_per_chunk(n_rows: int, vocab: int, element_size: int, chunk_bytes: int) -> int:
    """Rows whose ``(rows, vocab)`` logits buffer fits ``chunk_bytes`` (at least 1).

    Counted in the logits buffer's own dtype (2 bytes for fp16/bf16, 4 for fp32): that is
    the memory actually held. Above 128 rows the count is rounded down to a multiple of 128
    so the GEMMs of every full chunk see tile-aligned row counts.
    """
    rows = max(1, chunk_bytes // (vocab * element_size))
    if rows >= 128:
        rows -= rows % 128
    return min(rows, max(n_rows, 1))


def _kernel_meta() -> dict:
    if _INTERPRET:
        return {"BLOCK_V": _INTERPRET_BLOCK_V, "num_warps": 1}
    return {"BLOCK_V": _GPU_BLOCK_V, "num_warps": _GPU_NUM_WARPS}


def _linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    labels: torch.Tensor, ignore_index: int, need_hidden: bool, need_weight: bool,
    need_bias: bool, chunk_bytes: int, grad_output: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The chunked loop; each gradient is computed only if asked for (the GEMM it needs
    is skipped otherwise), and is the gradient of ``grad_output * loss`` (``grad_output``
    a 1-element tensor, None meaning 1). Inputs already validated."""
    n_rows, width = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    acc = accumulator_dtype(hidden.dtype)
    need_bias = need_bias and bias is not None
    labels = labels.contiguous()
    # Checked here (one host sync), unless the caller checked the labels already; either
    # way the mean's denominator stays on the device, folded into the gradient scale.
    n_valid = _count_valid_labels(labels, ignore_index, vocab) if value_checks_enabled() else None

    grad_hidden = _empty((n_rows, width), hidden.dtype, device) if need_hidden else None
    if n_valid == 0:
        # No valid label (this covers 0 rows): the mean is defined as 0, every gradient is
        # exactly 0, and no GEMM runs.
        if grad_hidden is not None:
            grad_hidden.zero_()
        # torch.zeros, not zeros_like: contiguous whatever the inputs' strides, as the
        # GEMM path's gradients and the custom op's fake are.
        return (torch.zeros((), dtype=acc, device=device), grad_hidden,
                torch.zeros(weight.shape, dtype=weight.dtype, device=device)
                if need_weight else None,
                torch.zeros(bias.shape, dtype=bias.dtype, device=device) if need_bias else None)

    rows = _rows_per_chunk(n_rows, vocab, hidden.element_size(), chunk_bytes)
    logits_buffer = _empty((rows, vocab), hidden.dtype, device)
    bias_in = bias.to(hidden.dtype) if bias is not None else None
    # fp32 weights with fp16/bf16 hidden (autocast): one cast copy (no copy otherwise),
    # the GEMMs in hidden's dtype; grad_weight comes back in the weight's dtype (chunks
    # summed in fp32), as autocast's cast-then-F.linear would give it.
    gemm_weight = weight.to(hidden.dtype)
    loss_rows = _empty((n_rows,), acc, device)
    compute_grad = need_hidden or need_weight or need_bias
    count = (labels != ignore_index).sum().clamp_min(1).to(acc).reshape(1)
    if grad_output is None:
        grad_scale = 1.0 / count
    else:
        grad_scale = grad_output.detach().reshape(1).to(device=device, dtype=acc) / count
    weight_t = gemm_weight.t()
    grad_weight: Optional[torch.Tensor] = None
    grad_weight_acc: Optional[torch.Tensor] = None  # fp32 sum over chunks (fp16/bf16)
    grad_bias_acc: Optional[torch.Tensor] = None
    meta = _kernel_meta()
    for index, start in enumerate(range(0, n_rows, rows)):
        end = min(start + rows, n_rows)
        h_chunk = hidden[start:end]
        logits = logits_buffer[: end - start]
        if bias_in is None:
            torch.mm(h_chunk, weight_t, out=logits)
        else:
            torch.addmm(bias_in, h_chunk, weight_t, out=logits)
        _cross_entropy_rows_kernel[(end - start,)](
            logits, labels[start:end], loss_rows[start:end], grad_scale,
            vocab, ignore_index, 1,  # n_valid: already divided into grad_scale
            logits.stride(0),
            COMPUTE_GRAD=compute_grad, ACC_DTYPE=tl.float64 if acc == torch.float64
            else tl.float32,
            **meta,
        )
        # logits now holds dlogits (when compute_grad).
        if need_hidden:
            torch.mm(logits, gemm_weight, out=grad_hidden[start:end])
        if need_weight:
            if index == 0:
                grad_weight = _empty(weight.shape, hidden.dtype, device)
                torch.mm(logits.t(), h_chunk, out=grad_weight)
            elif hidden.dtype == acc:
                grad_weight.addmm_(logits.t(), h_chunk)
            else:
                # fp16/bf16: cuBLAS sums each chunk in fp32 internally; the chunks are
                # summed in fp32 here, not rounded to fp16/bf16 after every chunk.
                if grad_weight_acc is None:
                    grad_weight_acc, grad_weight = grad_weight.to(acc), None
                grad_weight_acc += torch.mm(logits.t(), h_chunk)
        if need_bias:
            column_sums = logits.sum(0, dtype=acc)
            grad_bias_acc = column_sums if grad_bias_acc is None else grad_bias_acc + column_sums

    if grad_weight_acc is not None:
        grad_weight = grad_weight_acc.to(weight.dtype)
    elif grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)  # one chunk of an autocast layout
    loss = loss_rows.sum() / count[0]
    grad_bias = grad_bias_acc.to(bias.dtype) if need_bias else None
    return loss, grad_hidden, grad_weight, grad_bias


def linear_cross_entropy_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    labels: torch.Tensor,
    ignore_index: int,
    need_grads: bool,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    check_arguments: bool = True,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Mean cross-entropy of ``hidden @ weight.T + bias`` and, if ``need_grads``, its
    gradients, chunk by chunk over the rows.

    ``hidden``: ``(N, H)`` fp16/bf16/fp32/fp64; ``weight``: ``(V, H)`` of hidden's dtype,
    or fp32 with fp16/bf16 hidden (autocast's layout: the GEMMs run in hidden's dtype);
    ``bias``: ``(V,)`` any float dtype, or None; ``labels``: ``(N,)`` int64 in ``[0, V)`` or
    ``ignore_index``. ``chunk_bytes`` bounds the logits buffer of one chunk.

    Returns ``(loss, grad_hidden, grad_weight, grad_bias)``: ``loss`` a 0-d fp32 tensor
    (fp64 for fp64 inputs, like the reference), 0.0 when no label is valid; the gradients
    of ``loss`` (already divided by the number of valid labels) in the dtypes of hidden,
    weight and bias, or None when ``need_grads`` is False (``grad_bias`` also when
    ``bias`` is None).
    """
    if check_arguments:  # False: spanbert_fast.ops checked them at its public boundary
        _check_inputs(hidden, weight, bias, labels, ignore_index, chunk_bytes)
        if not isinstance(need_grads, bool):
            raise TypeError(f"need_grads must be a bool, got {type(need_grads).__name__}")
    with torch.no_grad():
        return _linear_cross_entropy(hidden, weight, bias, labels, ignore_index,
                                     need_grads, need_grads, need_grads, chunk_bytes)


def forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            labels: torch.Tensor, ignore_index: int, *, check_arguments: bool = True
            ) -> torch.Tensor:
    """The op registry's forward: the loss alone (no gradient work)."""
    loss, _, _, _ = linear_cross_entropy_forward(hidden, weight, bias, labels,
                                                 ignore_index, need_grads=False,
                                                 check_arguments=check_arguments)
    return loss


def backward(grad_output: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
             bias: Optional[torch.Tensor], labels: torch.Tensor, ignore_index: int,
             needs_input_grad: Sequence[bool], *, check_arguments: bool = True
             ) -> List[torch.Tensor]:
    """The op registry's backward: ``[d_hidden, d_weight, d_bias, d_labels]``.

    Recomputes the chunked forward with only the requested gradients (a frozen ``weight``
    skips its GEMM) and scales them by ``grad_output`` (a 0-d tensor). A 0-element tensor
    stands in for every gradient not needed, for ``bias`` None, and always for labels.
    """
    if check_arguments:
        _check_inputs(hidden, weight, bias, labels, ignore_index, DEFAULT_CHUNK_BYTES)
        if not isinstance(grad_output, torch.Tensor) or grad_output.numel() != 1:
            raise ValueError("grad_output must be a 1-element tensor (the loss is a scalar), "
                             f"got {getattr(grad_output, 'shape', type(grad_output).__name__)}")
    need_hidden, need_weight, need_bias, _ = needs_flags(
        needs_input_grad, ("hidden", "weight", "bias", "labels"))
    with torch.no_grad():
        _, grad_hidden, grad_weight, grad_bias = _linear_cross_entropy(
            hidden, weight, bias, labels, ignore_index, need_hidden, need_weight,
            need_bias, DEFAULT_CHUNK_BYTES, grad_output=grad_output)
    # Fresh buffers of this call: no alias of an input or of each other escapes.
    return [grad if grad is not None else hidden.new_empty(0)
            for grad in (grad_hidden, grad_weight, grad_bias)] + [hidden.new_empty(0)]


def not_supported_reasons(tensors: Sequence[torch.Tensor]) -> List[str]:
    """Every float input the public op accepts runs here (the rows are walked in blocks):
    no reason."""
    return []
