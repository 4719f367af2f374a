"""The readable NumPy version of the span-masking algorithm (:mod:`spanbert_fast.masking`):
same distribution as the compiled op, reproducible for a seed and offset, not bit-identical."""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from .parameters import (IGNORE_INDEX, check_replace_probs, mask_ratio_fraction, masking_budget,
                         span_length_probabilities)
from .sampler import SpanMasker

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
    ratio = mask_ratio_fraction(mask_ratio)
    length_choices = np.arange(1, max_span_words + 1)
    length_probs = np.array(span_length_probabilities(geometric_p, max_span_words))
    replace_probs = np.asarray(check_replace_probs(replace_probs), dtype=np.float64)
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
        budget = masking_budget(int(maskable.sum()), ratio)
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
