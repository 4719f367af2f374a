"""The span-masking sampler: :class:`SpanMasker` and :func:`word_starts` (algorithm and
backends: :mod:`spanbert_fast.masking`)."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Union

import torch

from .._C import load_extension, load_native_ops
from .parameters import (ACCEPTED_ID_DTYPES, INT64_RANGE, MAX_SPAN_WORDS_LIMIT,
                         TOKEN_IS_CONTINUATION, TOKEN_IS_SPECIAL, as_vocab_table, check_int,
                         check_probability, check_replace_probs, check_tensor, integer_cdf,
                         mask_ratio_fraction, span_length_probabilities, unigram_integer_cdf)


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
    if input_ids.dtype not in ACCEPTED_ID_DTYPES:
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


# --------------------------------------------------------------------------- the sampler


class SpanMaskingOutput(NamedTuple):
    """What :class:`SpanMasker` returns (all int64, on the device of the input ids).

    input_ids: (batch, seq) the masked ids.
    labels: (batch, seq) the original id where masked, -100 elsewhere.
    sbo_targets: (N, 5) rows ``(row, left, right, rel_pos, label)``, sorted by row then
        position (see the module docstring).
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    sbo_targets: torch.Tensor


class SpanMasker:
    """SpanBERT's span masking, as a callable that holds its tables and a sequence counter.

    Args:
        mask_token_id: id of ``[MASK]``.
        vocab_size: vocabulary size; ids, tables and random tokens live in ``[0, vocab_size)``.
        is_continuation: ``(vocab_size,)`` bool, True for ``##`` continuation pieces; word
            starts are derived from it on the device. None: every piece starts a word unless
            a call passes ``word_starts``.
        special_token_ids: ids never masked ([CLS], [SEP], [PAD], ...). Padding positions
            (``attention_mask`` off) are never masked whatever their id.
        mask_ratio: share of the maskable tokens to mask, rounded up (0.15).
        geometric_p: parameter of the span-length distribution in words (0.2).
        max_span_words: span lengths are clipped to ``1..max_span_words`` and renormalised
            (10; at most 64).
        max_span_len: SBO targets only for ``rel_pos < max_span_len``: the SBO position
            table's size, ``config.sbo_max_targets`` (15).
        replace_probs: (mask, random, keep) probabilities per merged span (0.8, 0.1, 0.1).
        unigram: ``(vocab_size,)`` non-negative weights for the random tokens, or None
            (uniform over the vocabulary). Turned once into an integer CDF (weights below
            about 2^-33 of the total may round to 0). The original SpanBERT draws them from
            the corpus unigram (token counts of the training data).
        seed: key of every sequence's random stream, in ``[0, 2^63)``.
        sbo_special_boundaries: False (the original SpanBERT): a merged span gets SBO
            targets only when both neighbours are maskable tokens (never [CLS]/[SEP]);
            True: any real token, special ones included, may be a boundary.

    The tables live on one device (that of ``is_continuation``, else the CPU); move them
    with :meth:`to` before masking tensors of another device.

    Each sequence's random stream is keyed by ``(seed, offset)``. A call's ``offsets``
    default to the running counter of sequences seen (``sequences_seen``), advanced by the
    batch size, so consecutive batches differ and a run is reproducible; save and restore
    it with :meth:`state_dict` / :meth:`load_state_dict`. Explicit ``offsets`` (e.g. each
    sequence's index in the dataset) leave the counter alone; with them, change the seed
    between epochs for fresh masks.
    """

    def __init__(
        self,
        mask_token_id: int,
        vocab_size: int,
        is_continuation: Any = None,
        special_token_ids: Iterable[int] = (),
        mask_ratio: float = 0.15,
        geometric_p: float = 0.2,
        max_span_words: int = 10,
        max_span_len: int = 15,
        replace_probs: Sequence[float] = (0.8, 0.1, 0.1),
        unigram: Any = None,
        seed: int = 0,
        sbo_special_boundaries: bool = False,
    ) -> None:
        if not isinstance(sbo_special_boundaries, bool):
            raise TypeError("sbo_special_boundaries must be a bool, got "
                            f"{type(sbo_special_boundaries).__name__}")
        self.sbo_special_boundaries = sbo_special_boundaries
        self.vocab_size = check_int("vocab_size", vocab_size, 1, (1 << 31) - 1)
        self.mask_token_id = check_int("mask_token_id", mask_token_id, 0, self.vocab_size - 1)
        if (isinstance(special_token_ids, (str, bytes))
                or not isinstance(special_token_ids, Iterable)):
            raise TypeError("special_token_ids must be an iterable of ints, got "
                            f"{type(special_token_ids).__name__}")
        self.special_token_ids = tuple(
            check_int(f"special_token_ids[{k}]", i, 0, self.vocab_size - 1)
            for k, i in enumerate(special_token_ids))
        self.mask_ratio = check_probability("mask_ratio", mask_ratio)
        self.geometric_p = check_probability("geometric_p", geometric_p, allow_zero=False)
        self.max_span_words = check_int("max_span_words", max_span_words, 1, MAX_SPAN_WORDS_LIMIT)
        self.max_span_len = check_int("max_span_len", max_span_len, 1)
        self.replace_probs = check_replace_probs(replace_probs)
        self.seed = check_int("seed", seed, 0, INT64_RANGE[1])
        self.sequences_seen = 0

        device = torch.device("cpu")
        flags = torch.zeros(self.vocab_size, dtype=torch.uint8)
        if is_continuation is not None:
            table = as_vocab_table("is_continuation", is_continuation, self.vocab_size, "bool")
            device = table.device
            flags |= table.detach().cpu().to(torch.uint8) * TOKEN_IS_CONTINUATION
        if self.special_token_ids:
            flags[list(self.special_token_ids)] |= TOKEN_IS_SPECIAL
        self.is_continuation = (None if is_continuation is None
                                else (flags & TOKEN_IS_CONTINUATION) != 0)
        self.unigram = None if unigram is None else as_vocab_table(
            "unigram", unigram, self.vocab_size, "weights").detach().cpu().double()
        # Integer forms of every probability, computed once here so that CPU and CUDA (and
        # any batch) see the same numbers.
        ratio = mask_ratio_fraction(self.mask_ratio)
        self._mask_ratio = (ratio.numerator, ratio.denominator)
        self._span_word_thresholds = integer_cdf(
            span_length_probabilities(self.geometric_p, self.max_span_words))[:-1]
        # (P(mask), P(mask) + P(random)) x 2^32: one uint32 draw per merged span.
        self._replace_thresholds = tuple(integer_cdf(self.replace_probs)[:2])
        self._token_flags = flags
        self._unigram_cdf = (None if unigram is None
                             else unigram_integer_cdf(unigram, self.vocab_size))
        self.to(device)

    # ----------------------------------------------------------------- state

    @property
    def device(self) -> torch.device:
        """The device of the masker's tables (that of the ids it accepts)."""
        return self._token_flags.device

    def to(self, device: Union[str, torch.device]) -> "SpanMasker":
        """Moves the tables to ``device``; returns self (like ``nn.Module.to``)."""
        device = torch.device(device)
        self._token_flags = self._token_flags.to(device)
        if self._unigram_cdf is not None:
            self._unigram_cdf = self._unigram_cdf.to(device)
        return self

    def state_dict(self) -> Dict[str, int]:
        """``{"seed", "sequences_seen"}``: what a resumed run needs to continue identically."""
        return {"seed": self.seed, "sequences_seen": self.sequences_seen}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        if not isinstance(state, dict) or "sequences_seen" not in state:
            raise ValueError("state must be a dict from SpanMasker.state_dict() with "
                             f"'sequences_seen', got {state!r}")
        self.sequences_seen = check_int("state['sequences_seen']", state["sequences_seen"], 0)
        if "seed" in state:
            self.seed = check_int("state['seed']", state["seed"], 0, INT64_RANGE[1])

    def take_offsets(self, count: int) -> List[int]:
        """The next ``count`` values of the sequence counter (and advances it)."""
        first = self.sequences_seen
        self.sequences_seen += count
        return list(range(first, first + count))

    def __repr__(self) -> str:
        return (f"SpanMasker(mask_token_id={self.mask_token_id}, vocab_size={self.vocab_size}, "
                f"special_token_ids={list(self.special_token_ids)}, mask_ratio={self.mask_ratio}, "
                f"geometric_p={self.geometric_p}, max_span_words={self.max_span_words}, "
                f"max_span_len={self.max_span_len}, replace_probs={self.replace_probs}, "
                f"unigram={'given' if self.unigram is not None else None}, seed={self.seed}, "
                f"sbo_special_boundaries={self.sbo_special_boundaries}, "
                f"device={self.device}, sequences_seen={self.sequences_seen})")

    # ----------------------------------------------------------------- masking

    def __call__(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        word_starts: Optional[torch.Tensor] = None,
        offsets: Union[torch.Tensor, Sequence[int], None] = None,
        *,
        lengths: Union[torch.Tensor, Sequence[int], None] = None,
    ) -> SpanMaskingOutput:
        """Masks a batch.

        Args:
            input_ids: (batch, seq) int64 (or int32) ids in ``[0, vocab_size)``, padding
                included, on ``self.device``.
            attention_mask: (batch, seq) bool or integer, nonzero = real token; or None
                (then ``lengths``, or every position is real).
            word_starts: (batch, seq) bool, True where a piece starts a word; overrides
                ``is_continuation``.
            offsets: (batch,) int64 tensor or ints: the random stream of each sequence (e.g.
                its index in the dataset). None: the next ``batch`` values of the counter.
            lengths: (batch,) ints, the real length of each right-padded row (instead of
                ``attention_mask``).

        Returns:
            :class:`SpanMaskingOutput` ``(input_ids, labels, sbo_targets)``.
        """
        input_ids, attention_mask, word_starts = self._check_call(
            input_ids, attention_mask, word_starts, lengths)
        batch = input_ids.shape[0]
        counted = offsets is None
        if counted:  # the counter's next values; it advances only once the batch is masked
            offsets = list(range(self.sequences_seen, self.sequences_seen + batch))
        offsets = self._offsets_tensor(offsets, batch, input_ids.device)
        out = self._mask_checked(input_ids, attention_mask, word_starts, offsets)
        if counted:
            self.sequences_seen += batch
        return out

    def _mask_checked(self, input_ids, attention_mask, word_starts, offsets) -> SpanMaskingOutput:
        """Masks a batch whose arguments ``_check_call`` and ``_offsets_tensor`` accepted."""
        extension = load_extension()
        native_ops = load_native_ops()
        if extension is None or native_ops is None:
            self._check_id_range(input_ids)
            return self._call_reference(input_ids, attention_mask, word_starts, offsets)
        native_device = input_ids.device.type == "cpu" or (
            input_ids.device.type == "cuda" and bool(extension.with_cuda))
        if native_device:
            tables = (self._token_flags, self._unigram_cdf)
            arguments = (input_ids, attention_mask, word_starts, offsets)
        else:  # e.g. CUDA ids and an extension built without CUDA: the CPU op, moved back
            tables = (self._token_flags.cpu(),
                      None if self._unigram_cdf is None else self._unigram_cdf.cpu())
            arguments = tuple(None if t is None else t.cpu()
                              for t in (input_ids, attention_mask, word_starts, offsets))
        ids, flags_mask, starts, row_offsets = arguments
        # The op checks the id range while it runs (no extra pass over the ids, no extra
        # sync on CUDA) and raises the ValueError of _check_id_range, word for word.
        masked_ids, labels, sbo_targets = native_ops.span_masking(
            ids, tables[0], flags_mask, starts, row_offsets, tables[1], self.seed,
            self.mask_token_id, self._mask_ratio[0], self._mask_ratio[1],
            self._span_word_thresholds, self._replace_thresholds[0],
            self._replace_thresholds[1], self.max_span_len, self.sbo_special_boundaries)
        if not native_device:
            device = input_ids.device
            masked_ids, labels, sbo_targets = (
                t.to(device) for t in (masked_ids, labels, sbo_targets))
        return SpanMaskingOutput(masked_ids, labels, sbo_targets)

    def _check_call(self, input_ids, attention_mask, word_starts, lengths):
        check_tensor("input_ids", input_ids)
        check_tensor("attention_mask", attention_mask, optional=True)
        check_tensor("word_starts", word_starts, optional=True)
        if input_ids.dtype not in ACCEPTED_ID_DTYPES:
            raise TypeError(f"input_ids must be int64 or int32, got {input_ids.dtype}")
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be 2-D (batch, seq), got shape {tuple(input_ids.shape)}")
        if input_ids.device != self.device:
            raise ValueError(
                f"input_ids is on {input_ids.device} but the masker's tables (is_continuation, "
                f"special_token_ids, unigram) are on {self.device}; call "
                f"masker.to({str(input_ids.device)!r}) first")
        input_ids = input_ids.long()
        batch, seq = input_ids.shape
        if lengths is not None:
            if attention_mask is not None:
                raise ValueError("give attention_mask or lengths, not both")
            lengths = (lengths.to(input_ids.device) if isinstance(lengths, torch.Tensor) else
                       torch.as_tensor(lengths, dtype=torch.int64, device=input_ids.device))
            if (lengths.dtype.is_floating_point or lengths.dtype == torch.bool
                    or lengths.shape != (batch,)):
                raise ValueError(f"lengths must be ({batch},) integers, got {lengths.dtype} of "
                                 f"shape {tuple(lengths.shape)}")
            if batch and (int(lengths.min()) < 0 or int(lengths.max()) > seq):
                raise ValueError(f"lengths must be in [0, {seq}] (the sequence width), got "
                                 f"values in [{int(lengths.min())}, {int(lengths.max())}]")
            attention_mask = torch.arange(seq, device=input_ids.device)[None, :] < lengths[:, None]
        for name, tensor in (("attention_mask", attention_mask), ("word_starts", word_starts)):
            if tensor is None:
                continue
            if tensor.shape != input_ids.shape:
                raise ValueError(f"{name} must have the shape of input_ids "
                                 f"{tuple(input_ids.shape)}, got {tuple(tensor.shape)}")
            if tensor.device != input_ids.device:
                raise ValueError(f"{name} must be on the device of input_ids ({input_ids.device}), "
                                 f"got {tensor.device}")
        if attention_mask is not None:
            if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
                raise TypeError("attention_mask must be bool or an integer dtype (nonzero = real "
                                f"token), got {attention_mask.dtype}")
            if attention_mask.dtype != torch.bool:
                attention_mask = attention_mask != 0
        if word_starts is not None and word_starts.dtype != torch.bool:
            raise TypeError(f"word_starts must be bool, got {word_starts.dtype}")
        return input_ids, attention_mask, word_starts

    def _check_id_range(self, input_ids: torch.Tensor) -> None:
        """The id range, for the fallback (the native op checks it while it runs)."""
        if input_ids.numel() == 0:
            return
        out_of_range = (input_ids < 0) | (input_ids >= self.vocab_size)
        if bool(out_of_range.any()):
            row, column = out_of_range.nonzero()[0].tolist()
            raise ValueError(f"input_ids must be in [0, {self.vocab_size}) (vocab_size), got "
                             f"{int(input_ids[row, column])} at position ({row}, {column})")

    def _offsets_tensor(self, offsets, batch: int, device: torch.device) -> torch.Tensor:
        if isinstance(offsets, torch.Tensor):
            if (offsets.dtype.is_floating_point or offsets.dtype.is_complex
                    or offsets.dtype == torch.bool):
                raise TypeError(f"offsets must be integers, got {offsets.dtype}")
            tensor = offsets.to(device=device, dtype=torch.int64)
        else:
            if isinstance(offsets, (str, bytes)) or not isinstance(offsets, Sequence):
                raise TypeError(f"offsets must be a tensor or a sequence of ints, got "
                                f"{type(offsets).__name__}")
            values = [check_int(f"offsets[{k}]", v, *INT64_RANGE) for k, v in enumerate(offsets)]
            tensor = torch.tensor(values, dtype=torch.int64, device=device)
        if tensor.shape != (batch,):
            raise ValueError(f"offsets must have shape ({batch},) (one per sequence), got "
                             f"{tuple(tensor.shape)}")
        return tensor.contiguous()

    def _call_reference(self, input_ids, attention_mask, word_starts, offsets) -> SpanMaskingOutput:
        """The fallback without the extension: the NumPy reference (not bit-identical)."""
        from .reference import reference_span_masking  # it validates through SpanMasker

        masked_ids, labels, sbo_targets = reference_span_masking(
            input_ids.cpu().numpy(),
            None if attention_mask is None else attention_mask.cpu().numpy(),
            mask_token_id=self.mask_token_id, vocab_size=self.vocab_size,
            is_continuation=None if self.is_continuation is None else self.is_continuation.numpy(),
            word_starts=None if word_starts is None else word_starts.cpu().numpy(),
            special_token_ids=self.special_token_ids, mask_ratio=self.mask_ratio,
            geometric_p=self.geometric_p, max_span_words=self.max_span_words,
            max_span_len=self.max_span_len, replace_probs=self.replace_probs,
            unigram=None if self.unigram is None else self.unigram.numpy(),
            seed=self.seed, offsets=offsets.cpu().numpy(),
            sbo_special_boundaries=self.sbo_special_boundaries)
        device = input_ids.device
        return SpanMaskingOutput(*(torch.from_numpy(a).to(device)
                                   for a in (masked_ids, labels, sbo_targets)))
