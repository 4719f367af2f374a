"""Span masking for SpanBERT pretraining: the sampler, its collator and its NumPy reference.

The algorithm (DESIGN.md, "What SpanBERT is"), per sequence:

* maskable tokens = real tokens (``attention_mask`` on) that are not special tokens;
  budget = ceil(mask_ratio x maskable tokens), computed exactly (the ratio is taken as the
  nearest fraction with a denominator <= 10^6, so 0.15 is 3/20);
* until ``budget`` tokens are masked: draw a span length in whole words from the geometric
  distribution (``geometric_p``) clipped to ``1..max_span_words`` and renormalised (mean
  3.8 words for 0.2 and 10); draw an anchor uniformly among the maskable positions that are
  not masked yet (uniform over the maskable ones, redrawn while it lands on a masked one);
  move it left to the start of its word; mask forward over that many words,
  stopping at a special token, padding or the end of the row, or as soon as the budget is
  met (so the last span may be cut, and exactly ``budget`` tokens are masked). A word starts
  at a piece that is not a ``##`` continuation (``is_continuation[id]`` false, or
  ``word_starts`` true), at position 0 and after any special or padding position;
* overlapping and adjacent spans merge: every maximal run of masked positions is a merged
  span, the unit of the 80/10/10 replacement (all ``[MASK]``, all random tokens, or all
  unchanged, by ``replace_probs``) and of the span-boundary objective;
* special tokens and padding are never masked.

Outputs (:class:`SpanMaskingOutput`):

* ``input_ids`` (batch, seq) int64: the masked ids;
* ``labels`` (batch, seq) int64: the original id where masked, -100 elsewhere (the MLM
  ``labels`` of :class:`spanbert_fast.SpanBertForPreTraining`);
* ``sbo_targets`` (N, 5) int64 rows ``(row, left, right, rel_pos, label)``
  (:data:`spanbert_fast.SBO_TARGET_FIELDS`), sorted by row then position: one per masked
  token of every merged span ``s..e`` whose outer boundaries ``left = s - 1`` and
  ``right = e + 1`` are both maskable tokens of the row (real, not special: never [CLS],
  [SEP] or padding, as in the original SpanBERT, which masks the block before adding
  [CLS]/[SEP] and gives targets only to spans with a block token on each side);
  ``sbo_special_boundaries=True`` also accepts special tokens as boundaries (any real
  token; about 1% more targets per 512-token block). ``rel_pos = i - s`` and ``label``
  = the original id at ``left + 1 + rel_pos``.
  **Merged spans longer than max_span_len**: only their first ``max_span_len`` tokens get
  SBO targets (``rel_pos < max_span_len`` always, as the SBO position table of
  ``config.sbo_max_targets`` = 15 entries requires); the rest keep their MLM labels.

Random tokens are drawn uniformly from the whole vocabulary (as BERT does) unless
``unigram`` gives weights; the original SpanBERT draws them from the corpus unigram (the
``pretrain`` command passes the corpus's token counts). Give special tokens a zero weight
there to keep them out.

Backends. :class:`SpanMasker` runs the compiled op ``torch.ops.spanbert_fast.span_masking``
(``csrc/``): one sampling core shared by the CPU op (sequences in parallel) and the CUDA
kernel (a thread per sequence), every random decision in integers from a Philox4x32-10
stream keyed by ``(seed, offset)``. The same sequence with the same seed and offset gets
the bit-identical result on CPU and CUDA, alone or anywhere inside any batch, whatever the
padding. On CUDA tensors with an extension built without CUDA kernels, the CPU op runs and
the results move back (still bit-identical). Without the extension (after the one-time
warning of :mod:`spanbert_fast._C`) it falls back to :func:`reference_span_masking`, the
readable NumPy version of the same algorithm: same distribution, reproducible for a seed
and offset, but NOT bit-identical to the compiled op.

The native ops (reach them through :func:`load_native_ops`, which registers their fake
implementations for torch.compile and ``opcheck``):

* ``span_masking(input_ids, token_flags, attention_mask?, word_starts?, offsets,
  unigram_cdf?, seed, mask_token_id, mask_ratio_numerator, mask_ratio_denominator,
  span_word_thresholds, mask_threshold, random_threshold, max_span_len,
  sbo_special_boundaries=False) -> (masked_ids, labels, sbo_targets)``: the tables and integer thresholds are what :class:`SpanMasker`
  builds once (``token_flags`` (vocab,) uint8, bit 0 ``##`` piece, bit 1 special;
  probabilities as ``round(p x 2^32)``). ``sbo_targets`` has a data-dependent length: on
  CUDA the op makes one device-to-host copy (that length and the out-of-range id check).
* test-only: ``sample_span_lengths(seed, offsets, count, span_word_thresholds)`` draws span
  lengths with the sampler's own function (the distribution before merging), and
  ``philox4x32_10(counter, key)`` exposes the generator for its known-answer test.

:func:`word_starts` finds word starts from a vocabulary table (compiled op on CPU/CUDA,
:func:`_word_starts_torch` otherwise, identical results).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from fractions import Fraction
from typing import Any, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ._C import load_extension

__all__ = [
    "word_starts",
    "SpanMasker",
    "SpanMaskingOutput",
    "SpanMaskingCollator",
    "reference_span_masking",
    "span_length_probabilities",
    "load_native_ops",
    "IGNORE_INDEX",
]

_ACCEPTED_ID_DTYPES = (torch.int64, torch.int32)

# labels where a token is not masked (transformers' and torch's cross-entropy convention).
IGNORE_INDEX = -100
# Bits of the (vocab_size,) uint8 table the op reads (csrc/span_masking_core.h).
_TOKEN_IS_CONTINUATION = 1
_TOKEN_IS_SPECIAL = 2
# Probabilities reach the op as integers t / 2^32 compared with uint32 draws.
_PROBABILITY_ONE = 1 << 32
# The op's threshold table holds max_span_words - 1 entries (core::kMaxSpanWords = 64).
MAX_SPAN_WORDS_LIMIT = 64
# The mask ratio as a fraction numerator / denominator: exact budgets in integers.
_MASK_RATIO_MAX_DENOMINATOR = 10**6
_INT64_RANGE = (-(1 << 63), (1 << 63) - 1)


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


# --------------------------------------------------------------------------- parameters


def span_length_probabilities(geometric_p: float = 0.2, max_span_words: int = 10) -> List[float]:
    """P(span length = k words) for k = 1..max_span_words: the geometric distribution
    ``p (1 - p)^(k - 1)`` clipped to ``1..max_span_words`` and renormalised (mean 3.8 words
    for p = 0.2 and 10 words)."""
    _check_probability("geometric_p", geometric_p, allow_zero=False)
    _check_int("max_span_words", max_span_words, 1, MAX_SPAN_WORDS_LIMIT)
    weights = [geometric_p * (1.0 - geometric_p) ** (k - 1) for k in range(1, max_span_words + 1)]
    total = math.fsum(weights)
    return [w / total for w in weights]


def _integer_cdf(probabilities: Sequence[float]) -> List[int]:
    """round(2^32 x CDF), non-decreasing and ending at exactly 2^32."""
    total = math.fsum(probabilities)
    cdf, running, previous = [], 0.0, 0
    for p in probabilities:
        running += p
        value = min(_PROBABILITY_ONE, max(previous, round(running / total * _PROBABILITY_ONE)))
        cdf.append(value)
        previous = value
    cdf[-1] = _PROBABILITY_ONE
    return cdf


def _mask_ratio_fraction(mask_ratio: float) -> Fraction:
    return Fraction(mask_ratio).limit_denominator(_MASK_RATIO_MAX_DENOMINATOR)


def _masking_budget(maskable: int, ratio: Fraction) -> int:
    """ceil(ratio x maskable), exactly."""
    return -((-maskable * ratio.numerator) // ratio.denominator)


def _check_int(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be in {bound}, got {value}")
    return value


def _check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_probability(name: str, value: Any, allow_zero: bool = True) -> float:
    value = _check_real(name, value)
    if not (0.0 <= value <= 1.0) or (not allow_zero and value == 0.0):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def _check_replace_probs(replace_probs: Any) -> Tuple[float, float, float]:
    if not isinstance(replace_probs, Sequence) or len(replace_probs) != 3:
        raise ValueError("replace_probs must be 3 probabilities (mask, random, keep), got "
                         f"{replace_probs!r}")
    probs = tuple(_check_probability(f"replace_probs[{k}]", p) for k, p in enumerate(replace_probs))
    if abs(math.fsum(probs) - 1.0) > 1e-6:
        raise ValueError(f"replace_probs must sum to 1 (mask, random, keep), got {probs} "
                         f"(sum {math.fsum(probs)})")
    return probs


def _as_vocab_table(name: str, value: Any, vocab_size: int, kind: str) -> torch.Tensor:
    """A (vocab_size,) tensor from a tensor / array / sequence; `kind` "bool" or "weights"."""
    if isinstance(value, torch.Tensor):
        table = value
    elif isinstance(value, (np.ndarray, Sequence)):
        table = torch.as_tensor(np.asarray(value))
    else:
        raise TypeError(f"{name} must be a tensor, array or sequence, got {type(value).__name__}")
    if kind == "bool" and table.dtype != torch.bool:
        raise TypeError(f"{name} must be bool (one flag per vocabulary entry), got {table.dtype}")
    if kind == "weights" and (table.dtype == torch.bool or table.is_complex()):
        raise TypeError(f"{name} must be real weights (float or int), got {table.dtype}")
    if table.dim() != 1 or table.shape[0] != vocab_size:
        raise ValueError(f"{name} must be 1-D with vocab_size = {vocab_size} entries, "
                         f"got shape {tuple(table.shape)}")
    return table


def _unigram_integer_cdf(unigram: Any, vocab_size: int) -> torch.Tensor:
    weights = _as_vocab_table("unigram", unigram, vocab_size, "weights").detach().cpu().double()
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("unigram must hold finite, non-negative weights")
    if float(weights.sum()) <= 0:
        raise ValueError("unigram must have a positive sum")
    return torch.tensor(_integer_cdf(weights.tolist()), dtype=torch.int64)


def _check_tensor(name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")


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
        self.vocab_size = _check_int("vocab_size", vocab_size, 1, (1 << 31) - 1)
        self.mask_token_id = _check_int("mask_token_id", mask_token_id, 0, self.vocab_size - 1)
        if (isinstance(special_token_ids, (str, bytes))
                or not isinstance(special_token_ids, Iterable)):
            raise TypeError("special_token_ids must be an iterable of ints, got "
                            f"{type(special_token_ids).__name__}")
        self.special_token_ids = tuple(
            _check_int(f"special_token_ids[{k}]", i, 0, self.vocab_size - 1)
            for k, i in enumerate(special_token_ids))
        self.mask_ratio = _check_probability("mask_ratio", mask_ratio)
        self.geometric_p = _check_probability("geometric_p", geometric_p, allow_zero=False)
        self.max_span_words = _check_int("max_span_words", max_span_words, 1, MAX_SPAN_WORDS_LIMIT)
        self.max_span_len = _check_int("max_span_len", max_span_len, 1)
        self.replace_probs = _check_replace_probs(replace_probs)
        self.seed = _check_int("seed", seed, 0, _INT64_RANGE[1])
        self.sequences_seen = 0

        device = torch.device("cpu")
        flags = torch.zeros(self.vocab_size, dtype=torch.uint8)
        if is_continuation is not None:
            table = _as_vocab_table("is_continuation", is_continuation, self.vocab_size, "bool")
            device = table.device
            flags |= table.detach().cpu().to(torch.uint8) * _TOKEN_IS_CONTINUATION
        if self.special_token_ids:
            flags[list(self.special_token_ids)] |= _TOKEN_IS_SPECIAL
        self.is_continuation = (None if is_continuation is None
                                else (flags & _TOKEN_IS_CONTINUATION) != 0)
        self.unigram = None if unigram is None else _as_vocab_table(
            "unigram", unigram, self.vocab_size, "weights").detach().cpu().double()
        # Integer forms of every probability, computed once here so that CPU and CUDA (and
        # any batch) see the same numbers.
        ratio = _mask_ratio_fraction(self.mask_ratio)
        self._mask_ratio = (ratio.numerator, ratio.denominator)
        self._span_word_thresholds = _integer_cdf(
            span_length_probabilities(self.geometric_p, self.max_span_words))[:-1]
        # (P(mask), P(mask) + P(random)) x 2^32: one uint32 draw per merged span.
        self._replace_thresholds = tuple(_integer_cdf(self.replace_probs)[:2])
        self._token_flags = flags
        self._unigram_cdf = (None if unigram is None
                             else _unigram_integer_cdf(unigram, self.vocab_size))
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
        self.sequences_seen = _check_int("state['sequences_seen']", state["sequences_seen"], 0)
        if "seed" in state:
            self.seed = _check_int("state['seed']", state["seed"], 0, _INT64_RANGE[1])

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
        _check_tensor("input_ids", input_ids)
        _check_tensor("attention_mask", attention_mask, optional=True)
        _check_tensor("word_starts", word_starts, optional=True)
        if input_ids.dtype not in _ACCEPTED_ID_DTYPES:
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
            values = [_check_int(f"offsets[{k}]", v, *_INT64_RANGE) for k, v in enumerate(offsets)]
            tensor = torch.tensor(values, dtype=torch.int64, device=device)
        if tensor.shape != (batch,):
            raise ValueError(f"offsets must have shape ({batch},) (one per sequence), got "
                             f"{tuple(tensor.shape)}")
        return tensor.contiguous()

    def _call_reference(self, input_ids, attention_mask, word_starts, offsets) -> SpanMaskingOutput:
        """The fallback without the extension: the NumPy reference (not bit-identical)."""
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


_fakes_registered = False


def load_native_ops():
    """``torch.ops.spanbert_fast`` with the sampler's fake implementations registered, or
    None when the extension is unavailable. Lazy, like :func:`load_extension`: importing
    this module loads nothing."""
    if load_extension() is None:
        return None
    if not _fakes_registered:
        _register_native_fakes()
    return torch.ops.spanbert_fast


def _register_native_fakes() -> None:
    """Fake (meta) implementations of the sampler's native ops (torch.compile, opcheck)."""
    global _fakes_registered

    def span_masking_fake(input_ids, token_flags, attention_mask, word_starts, offsets,
                          unigram_cdf, seed, mask_token_id, mask_ratio_numerator,
                          mask_ratio_denominator, span_word_thresholds, mask_threshold,
                          random_threshold, max_span_len, sbo_special_boundaries=False):
        # Device checks like the native op's (a tensor on "meta" among CPU ones lands here).
        for name, tensor in (("token_flags", token_flags), ("attention_mask", attention_mask),
                             ("word_starts", word_starts), ("offsets", offsets),
                             ("unigram_cdf", unigram_cdf)):
            if tensor is not None and tensor.device != input_ids.device:
                raise ValueError(f"span_masking: {name} must be on the device of input_ids "
                                 f"({input_ids.device}), got {tensor.device}")
        # The number of SBO targets depends on the data: an unbacked size.
        num_targets = torch.library.get_ctx().new_dynamic_size()
        return (input_ids.new_empty(input_ids.shape, dtype=torch.int64),
                input_ids.new_empty(input_ids.shape, dtype=torch.int64),
                input_ids.new_empty((num_targets, 5), dtype=torch.int64))

    def sample_span_lengths_fake(seed, offsets, count, span_word_thresholds):
        return offsets.new_empty((offsets.shape[0], count), dtype=torch.int64)

    def philox_fake(counter, key):
        return counter.new_empty((counter.shape[0], 4), dtype=torch.int64)

    for name, fake in (("spanbert_fast::span_masking", span_masking_fake),
                       ("spanbert_fast::sample_span_lengths", sample_span_lengths_fake),
                       ("spanbert_fast::philox4x32_10", philox_fake)):
        try:
            torch.library.register_fake(name, fake)
        except RuntimeError as exc:  # this module was reloaded: the fake is already there
            if "already" not in str(exc):
                raise
    _fakes_registered = True


# --------------------------------------------------------------------------- collator


class SpanMaskingCollator:
    """``collate_fn`` for a ``torch.utils.data.DataLoader`` of tokenized examples.

    Each example is a sequence of ids (list, tuple, 1-D tensor or array) or a mapping (a
    dict, transformers' ``BatchEncoding``, ...) with ``"input_ids"``, optionally
    ``"attention_mask"`` (positions where it is 0 are padding and are dropped before the
    batch is re-padded) and ``"index"`` (the example's index in the dataset). Returns the
    right-padded batch as a dict of int64 tensors on ``masker.device``: ``input_ids``
    (batch, seq) masked, ``attention_mask`` (batch, seq) 1/0, ``labels`` (batch, seq) and
    ``sbo_targets`` (N, 5) (see :class:`SpanMasker`).

    Offsets (each sequence's random stream): an example's ``"index"`` when present, else
    the masker's running counter. With ``num_workers > 0`` every worker holds its own copy
    of the counter, so give examples an ``"index"`` there (and change the masker's seed per
    epoch for fresh masks).

    Args:
        masker: the :class:`SpanMasker`.
        pad_token_id: id written into padding (never masked: it is outside the attention mask).
        pad_to_multiple_of: round the padded width up to a multiple of this.
    """

    def __init__(self, masker: SpanMasker, pad_token_id: int = 0,
                 pad_to_multiple_of: Optional[int] = None) -> None:
        if not isinstance(masker, SpanMasker):
            raise TypeError(f"masker must be a SpanMasker, got {type(masker).__name__}")
        self.masker = masker
        self.pad_token_id = _check_int("pad_token_id", pad_token_id, 0, masker.vocab_size - 1)
        self.pad_to_multiple_of = (None if pad_to_multiple_of is None else
                                   _check_int("pad_to_multiple_of", pad_to_multiple_of, 1))

    def state_dict(self) -> Dict[str, int]:
        return self.masker.state_dict()

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.masker.load_state_dict(state)

    def __call__(self, examples: Sequence[Any]) -> Dict[str, torch.Tensor]:
        if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
            raise TypeError(f"examples must be a list of examples, got {type(examples).__name__}")
        sequences: List[List[int]] = []
        indices: List[Optional[int]] = []
        for k, example in enumerate(examples):
            index = None
            keep = None
            if isinstance(example, Mapping):
                if "input_ids" not in example:
                    raise ValueError(f"examples[{k}] is a {type(example).__name__} without "
                                     "'input_ids'")
                index = example.get("index")
                if index is not None:
                    index = _check_int(f"examples[{k}]['index']", _as_int(index), *_INT64_RANGE)
                if example.get("attention_mask") is not None:
                    keep = _as_id_list(f"examples[{k}]['attention_mask']",
                                       example["attention_mask"])
                example = example["input_ids"]
            ids = _as_id_list(f"examples[{k}]", example)
            if keep is not None:
                if len(keep) != len(ids):
                    raise ValueError(f"examples[{k}]['attention_mask'] has {len(keep)} entries "
                                     f"but its 'input_ids' has {len(ids)}")
                # A tokenizer that padded the example: its padding is not text to mask.
                ids = [i for i, real in zip(ids, keep) if real]
            sequences.append(ids)
            indices.append(index)
        width = max((len(s) for s in sequences), default=0)
        if self.pad_to_multiple_of is not None:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.int64)
        for row, ids in enumerate(sequences):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
            attention_mask[row, :len(ids)] = 1
        # Examples without an index take the counter's next values; it advances only once
        # the batch is masked, so a batch that raised can be retried with the same masks.
        counter = iter(range(self.masker.sequences_seen, self.masker.sequences_seen
                             + sum(i is None for i in indices)))
        offsets = [next(counter) if i is None else i for i in indices]
        device = self.masker.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        out = self.masker(input_ids, attention_mask, offsets=offsets)
        self.masker.sequences_seen += sum(i is None for i in indices)
        return {"input_ids": out.input_ids, "attention_mask": attention_mask,
                "labels": out.labels, "sbo_targets": out.sbo_targets}


def _as_int(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return int(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _as_id_list(name: str, example: Any) -> List[int]:
    if isinstance(example, torch.Tensor):
        if example.dim() != 1 or example.dtype.is_floating_point or example.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor of ids, got {example.dtype} of "
                             f"shape {tuple(example.shape)}")
        return example.tolist()
    if isinstance(example, np.ndarray):
        if example.ndim != 1 or not np.issubdtype(example.dtype, np.integer):
            raise ValueError(f"{name} must be a 1-D integer array of ids, got {example.dtype} of "
                             f"shape {example.shape}")
        return example.tolist()
    if isinstance(example, (str, bytes)) or not isinstance(example, Sequence):
        raise TypeError(f"{name} must be a sequence of ids or a mapping (dict, BatchEncoding) "
                        f"with 'input_ids', got {type(example).__name__}")
    for position, value in enumerate(example):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name}[{position}] must be an int id, got {type(value).__name__}")
    return [int(v) for v in example]


# --------------------------------------------------------------------------- NumPy reference


def reference_span_masking(
    input_ids: np.ndarray,
    attention_mask: Optional[np.ndarray] = None,
    *,
    mask_token_id: int,
    vocab_size: int,
    is_continuation: Optional[np.ndarray] = None,
    word_starts: Optional[np.ndarray] = None,
    special_token_ids: Iterable[int] = (),
    mask_ratio: float = 0.15,
    geometric_p: float = 0.2,
    max_span_words: int = 10,
    max_span_len: int = 15,
    replace_probs: Sequence[float] = (0.8, 0.1, 0.1),
    unigram: Optional[np.ndarray] = None,
    seed: int = 0,
    offsets: Optional[np.ndarray] = None,
    sbo_special_boundaries: bool = False,
) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The span-masking algorithm of the module docstring, written for reading: one Python
    loop per sequence over NumPy arrays. It is the statistical oracle of the compiled op
    and its fallback; same distribution, NOT the same draws (each row uses
    ``numpy.random.default_rng([seed, offset])``, so it is reproducible and independent of
    the batch, but not bit-identical to :class:`SpanMasker`'s op).

    Arrays: ``input_ids`` (batch, seq) integers in ``[0, vocab_size)``; ``attention_mask``
    and ``word_starts`` (batch, seq) (nonzero = real token / starts a word);
    ``is_continuation`` (vocab_size,) bool; ``unigram`` (vocab_size,) weights; ``offsets``
    (batch,) integers (default ``0..batch-1``). Arguments as in :class:`SpanMasker`.

    Returns ``(masked_ids, labels, sbo_targets)``: (batch, seq), (batch, seq) and (N, 5)
    int64 arrays, as :class:`SpanMaskingOutput` describes.
    """
    # SpanMasker's constructor is the one definition of valid settings and tables.
    SpanMasker(mask_token_id, vocab_size, is_continuation=is_continuation,
               special_token_ids=special_token_ids, mask_ratio=mask_ratio,
               geometric_p=geometric_p, max_span_words=max_span_words,
               max_span_len=max_span_len, replace_probs=replace_probs, unigram=unigram, seed=seed,
               sbo_special_boundaries=sbo_special_boundaries)
    input_ids = np.asarray(input_ids, dtype=np.int64)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be 2-D (batch, seq), got shape {input_ids.shape}")
    batch, seq = input_ids.shape
    for name, array in (("attention_mask", attention_mask), ("word_starts", word_starts)):
        if array is not None and np.shape(array) != (batch, seq):
            raise ValueError(f"{name} must have the shape of input_ids {(batch, seq)}, got "
                             f"{np.shape(array)}")
    if offsets is not None and np.shape(offsets) != (batch,):
        raise ValueError(f"offsets must have shape ({batch},) (one per sequence), got "
                         f"{np.shape(offsets)}")
    if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= vocab_size):
        raise ValueError(f"input_ids must be in [0, {vocab_size}) (vocab_size), got values in "
                         f"[{input_ids.min()}, {input_ids.max()}]")
    real = (np.ones((batch, seq), dtype=bool) if attention_mask is None
            else np.asarray(attention_mask) != 0)
    special = np.zeros(vocab_size, dtype=bool)
    special[list(special_token_ids)] = True
    if word_starts is not None:
        piece_starts_word = np.asarray(word_starts) != 0
    elif is_continuation is not None:
        piece_starts_word = ~np.asarray(is_continuation, dtype=bool)[input_ids]
    else:
        piece_starts_word = np.ones((batch, seq), dtype=bool)
    offsets = np.arange(batch) if offsets is None else np.asarray(offsets, dtype=np.int64)
    ratio = _mask_ratio_fraction(mask_ratio)
    length_choices = np.arange(1, max_span_words + 1)
    length_probs = np.array(span_length_probabilities(geometric_p, max_span_words))
    replace_probs = np.asarray(_check_replace_probs(replace_probs), dtype=np.float64)
    random_token_probs = None
    if unigram is not None:
        weights = np.asarray(unigram, dtype=np.float64)
        random_token_probs = weights / weights.sum()

    masked_ids = input_ids.copy()
    labels = np.full((batch, seq), IGNORE_INDEX, dtype=np.int64)
    sbo_targets: List[Tuple[int, int, int, int, int]] = []
    for row in range(batch):
        rng = np.random.default_rng([seed, int(offsets[row]) % (1 << 64)])
        ids = input_ids[row]
        maskable = real[row] & ~special[ids]
        # A word starts at a non-continuation piece, at position 0 and after any position
        # that cannot be masked (a special token or padding ends a word).
        after_break = np.concatenate(([True], ~maskable[:-1]))
        starts_word = maskable & (piece_starts_word[row] | after_break)
        budget = _masking_budget(int(maskable.sum()), ratio)
        masked = np.zeros(seq, dtype=bool)
        count = 0
        while count < budget:
            words = int(rng.choice(length_choices, p=length_probs))
            anchor = int(rng.choice(np.flatnonzero(maskable & ~masked)))
            position = anchor
            while not starts_word[position]:
                position -= 1
            while True:  # mask forward over `words` words
                if not masked[position]:
                    masked[position] = True
                    count += 1
                    if count == budget:
                        break
                position += 1
                if position >= seq or not maskable[position]:
                    break
                if starts_word[position]:
                    words -= 1
                    if words == 0:
                        break
        labels[row, masked] = ids[masked]
        # Merged spans: maximal runs of masked positions.
        edges = np.diff(np.concatenate(([0], masked.astype(np.int8), [0])))
        for start, end in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
            mode = rng.choice(3, p=replace_probs)  # 0: [MASK], 1: random tokens, 2: unchanged
            if mode == 0:
                masked_ids[row, start:end] = mask_token_id
            elif mode == 1:
                masked_ids[row, start:end] = (
                    rng.integers(0, vocab_size, end - start) if random_token_probs is None
                    else rng.choice(vocab_size, size=end - start, p=random_token_probs))
            left, right = start - 1, end
            boundary = real[row] if sbo_special_boundaries else maskable
            if left >= 0 and right < seq and boundary[left] and boundary[right]:
                for rel_pos in range(min(end - start, max_span_len)):
                    sbo_targets.append((row, left, right, rel_pos, int(ids[start + rel_pos])))
    sbo = np.array(sbo_targets, dtype=np.int64).reshape(-1, 5)
    return masked_ids, labels, sbo
