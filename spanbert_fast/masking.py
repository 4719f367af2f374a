"""Span masking for SpanBERT pretraining.

SpanBERT masks whole words: a span's anchor moves left to the start of its word and the
span extends over whole words. :func:`word_starts` finds those starts; it runs on the
compiled extension (``csrc/``, CPU and CUDA) when it is loaded and on
:func:`_word_starts_torch` otherwise, with identical results.
"""

from __future__ import annotations

import torch

from ._C import load_extension

__all__ = ["word_starts"]

_ACCEPTED_ID_DTYPES = (torch.int64, torch.int32)


def word_starts(
    input_ids: torch.Tensor,
    is_continuation: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Which tokens start a word.

    A position starts a word when it is a real token (``attention_mask`` nonzero there, or
    no mask given) and its token is not a WordPiece continuation (``##...``).

    Args:
        input_ids: ``(batch, seq)`` int64 token ids (int32 is accepted and widened to int64),
            each in ``[0, len(is_continuation))`` (padded positions too).
        is_continuation: ``(vocab_size,)`` bool, True for the vocabulary entries that continue
            a word (``##`` pieces). Any length.
        attention_mask: ``(batch, seq)`` bool or integer (nonzero = real token), or None (every
            position is real). Floating masks are refused: compare them yourself.

    Returns:
        ``(batch, seq)`` bool, contiguous, on the device of ``input_ids``.

    Raises:
        TypeError: an argument is not a tensor or has the wrong dtype.
        ValueError: wrong rank, mismatched shapes or devices, or a token id out of range.
    """
    input_ids = _check_inputs(input_ids, is_continuation, attention_mask)
    extension = load_extension()
    if extension is not None and (input_ids.device.type == "cpu" or
                                  (input_ids.device.type == "cuda" and extension.with_cuda)):
        return torch.ops.spanbert_fast.word_starts(input_ids, is_continuation, attention_mask)
    return _word_starts_torch(input_ids, is_continuation, attention_mask)


def _word_starts_torch(
    input_ids: torch.Tensor,
    is_continuation: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure-torch :func:`word_starts` (no input checks): the fallback and the test oracle."""
    starts = ~is_continuation[input_ids]
    if attention_mask is not None:
        starts &= attention_mask != 0
    return starts.contiguous()


def _check_inputs(
    input_ids: object, is_continuation: object, attention_mask: object
) -> torch.Tensor:
    """Validates the arguments of :func:`word_starts`; returns ``input_ids`` as int64."""
    for name, value in (("input_ids", input_ids), ("is_continuation", is_continuation)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if attention_mask is not None and not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}"
        )
    if input_ids.dtype not in _ACCEPTED_ID_DTYPES:
        raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(
            f"input_ids must be 2-D (batch, seq), got shape {tuple(input_ids.shape)}"
        )
    if is_continuation.dtype != torch.bool:
        raise TypeError(
            "is_continuation must be bool (one flag per vocabulary entry), "
            f"got {is_continuation.dtype}"
        )
    if is_continuation.dim() != 1:
        raise ValueError(
            "is_continuation must be 1-D (vocab_size,), "
            f"got shape {tuple(is_continuation.shape)}"
        )
    if is_continuation.device != input_ids.device:
        raise ValueError(
            f"is_continuation must be on the device of input_ids ({input_ids.device}), "
            f"got {is_continuation.device}"
        )
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise TypeError(
                "attention_mask must be bool or an integer dtype (nonzero = real token), "
                f"got {attention_mask.dtype}"
            )
        if attention_mask.device != input_ids.device:
            raise ValueError(
                f"attention_mask must be on the device of input_ids ({input_ids.device}), "
                f"got {attention_mask.device}"
            )
    input_ids = input_ids.long()
    # Data-dependent (a device sync on CUDA): skipped while torch.compile traces, where the
    # native op's own range check still raises.
    if input_ids.numel() > 0 and not torch.compiler.is_compiling():
        vocab_size = is_continuation.shape[0]
        out_of_range = (input_ids < 0) | (input_ids >= vocab_size)
        if bool(out_of_range.any()):
            row, col = (int(i) for i in out_of_range.nonzero()[0])
            raise ValueError(
                f"input_ids must be in [0, {vocab_size}) (the length of is_continuation), "
                f"got {int(input_ids[row, col])} at position ({row}, {col}); "
                f"values span [{int(input_ids.min())}, {int(input_ids.max())}]"
            )
    return input_ids
