"""Span masking for SpanBERT pretraining: the sampler (:mod:`.sampler`), its collator
(:mod:`.collator`) and its NumPy reference (:mod:`.reference`).

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
:func:`.sampler._word_starts_torch` otherwise, identical results).
"""

from __future__ import annotations

from .._C import load_native_ops
from .collator import SpanMaskingCollator, StaticShapes
from .reference import reference_span_masking
from .parameters import IGNORE_INDEX, MAX_SPAN_WORDS_LIMIT, span_length_probabilities
from .sampler import SpanMasker, SpanMaskingOutput, word_starts

__all__ = [
    "word_starts",
    "SpanMasker",
    "SpanMaskingOutput",
    "SpanMaskingCollator",
    "StaticShapes",
    "reference_span_masking",
    "span_length_probabilities",
    "load_native_ops",
    "IGNORE_INDEX",
    "MAX_SPAN_WORDS_LIMIT",
]
