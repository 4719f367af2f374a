"""The span-masking sampler: its invariants, determinism, edge cases, bad input, collator.

Every invariant is checked on each output by :func:`check_masking`, for the compiled op
(through :class:`SpanMasker`) and for the NumPy reference alike. The statistics (span
lengths, 80/10/10, agreement with the reference) are in test_masking_statistics.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
import torch

from spanbert_fast import SBO_TARGET_FIELDS, SpanBertConfig, _C, masking
from spanbert_fast.masking import (
    IGNORE_INDEX,
    SpanMasker,
    SpanMaskingCollator,
    StaticShapes,
    SpanMaskingOutput,
    reference_span_masking,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# A toy WordPiece vocabulary: [PAD] [CLS] [SEP] [MASK], then ~30 % `##` pieces (about
# 1.4 pieces a word, as WordPiece gives on English text).
VOCAB_SIZE = 1000
PAD, CLS, SEP, MASK = 0, 1, 2, 3
SPECIAL_IDS = (PAD, CLS, SEP, MASK)


def toy_is_continuation(vocab_size: int = VOCAB_SIZE, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    table = torch.rand(vocab_size, generator=generator) < 0.3
    table[list(SPECIAL_IDS)] = False
    return table


IS_CONTINUATION = toy_is_continuation()


def make_masker(**overrides) -> SpanMasker:
    arguments = dict(mask_token_id=MASK, vocab_size=VOCAB_SIZE, is_continuation=IS_CONTINUATION,
                     special_token_ids=SPECIAL_IDS, seed=1234)
    arguments.update(overrides)
    return SpanMasker(**arguments)


def make_batch(batch: int, seq: int, seed: int, min_length: int = 0,
               middle_sep: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-padded rows ``[CLS] pieces ([SEP] pieces) [SEP] [PAD]...`` of random lengths.

    Returns (input_ids (batch, seq) int64, attention_mask (batch, seq) bool)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL_IDS), VOCAB_SIZE, (batch, seq), generator=generator)
    lengths = torch.randint(min(min_length, seq), seq + 1, (batch,), generator=generator)
    mask = torch.arange(seq)[None, :] < lengths[:, None]
    for row, length in enumerate(lengths.tolist()):
        if length >= 1:
            ids[row, 0] = CLS
        if length >= 2:
            ids[row, length - 1] = SEP
        if middle_sep and length >= 8:
            ids[row, length // 2] = SEP  # a second segment
    ids[~mask] = PAD
    return ids, mask


# --------------------------------------------------------------------------- invariants


def merged_spans(masked_row: np.ndarray) -> List[Tuple[int, int]]:
    """Maximal runs [start, end) of True."""
    edges = np.diff(np.concatenate(([0], masked_row.astype(np.int8), [0])))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def effective_word_starts(ids: np.ndarray, real: np.ndarray, special_ids, is_continuation=None,
                          word_starts=None) -> Tuple[np.ndarray, np.ndarray]:
    """(maskable, starts_word) as the module docstring defines them, re-derived here."""
    maskable = real & ~np.isin(ids, list(special_ids))
    if word_starts is not None:
        piece = np.asarray(word_starts, dtype=bool)
    elif is_continuation is not None:
        piece = ~np.asarray(is_continuation)[ids]
    else:
        piece = np.ones_like(ids, dtype=bool)
    after_break = np.ones_like(maskable)
    after_break[:, 1:] = ~maskable[:, :-1]
    return maskable, maskable & (piece | after_break)


def check_masking(input_ids, attention_mask, out, *, mask_ratio=0.15, max_span_len=15,
                  mask_token_id=MASK, special_ids=SPECIAL_IDS, is_continuation=IS_CONTINUATION,
                  word_starts=None, sbo_special_boundaries=False) -> Dict[str, np.ndarray]:
    """Asserts every invariant of one masking output; returns per-merged-span statistics:
    ``lengths``, ``modes`` (0 [MASK], 1 random, 2 unchanged) and ``sbo_per_row``.

    SBO boundaries: maskable tokens (the original's rule), or any real token with
    ``sbo_special_boundaries``."""
    masked_ids, labels, sbo = (np.asarray(t.cpu() if isinstance(t, torch.Tensor) else t)
                               for t in out)
    ids = np.asarray(input_ids.cpu() if isinstance(input_ids, torch.Tensor) else input_ids)
    batch, seq = ids.shape
    real = (np.ones_like(ids, dtype=bool) if attention_mask is None
            else np.asarray(attention_mask.cpu() if isinstance(attention_mask, torch.Tensor)
                            else attention_mask) != 0)
    assert masked_ids.shape == labels.shape == (batch, seq)
    assert masked_ids.dtype == labels.dtype == sbo.dtype == np.int64
    assert sbo.ndim == 2 and sbo.shape[1] == len(SBO_TARGET_FIELDS)
    maskable, starts_word = effective_word_starts(
        ids, real, special_ids, None if word_starts is not None else
        (None if is_continuation is None else np.asarray(is_continuation)), word_starts)
    masked = labels != IGNORE_INDEX

    bad = masked & ~maskable
    assert not bad.any(), (f"{int(bad.sum())} special/padding tokens masked, first at "
                           f"{np.argwhere(bad)[0]}")
    assert np.array_equal(labels[masked], ids[masked]), "labels must be the original ids"
    assert np.array_equal(masked_ids[~masked], ids[~masked]), "unmasked tokens must not change"
    from fractions import Fraction
    ratio = Fraction(mask_ratio).limit_denominator(10**6)
    budgets = -((-maskable.sum(1) * ratio.numerator) // ratio.denominator)
    counts = masked.sum(1)
    wrong = np.flatnonzero(counts != budgets)
    assert wrong.size == 0, (
        f"{wrong.size} rows mask the wrong number of tokens; row {wrong[0]}: "
        f"{counts[wrong[0]]} != ceil({mask_ratio} x {maskable[wrong[0]].sum()})")

    lengths, modes, sbo_per_row, expected_sbo = [], [], [], []
    for row in range(batch):
        row_sbo = 0
        mid_word_ends = 0
        for start, end in merged_spans(masked[row]):
            assert starts_word[row, start], (
                f"row {row}: merged span [{start}, {end}) starts inside a word")
            if end < seq and maskable[row, end] and not starts_word[row, end]:
                mid_word_ends += 1  # only the budget-cut last span may end inside a word
            lengths.append(end - start)
            replaced = masked_ids[row, start:end]
            if (replaced == mask_token_id).all():
                modes.append(0)
            elif (replaced == ids[row, start:end]).all():
                modes.append(2)
            else:
                modes.append(1)
            left, right = start - 1, end
            boundary = real[row] if sbo_special_boundaries else maskable[row]
            if left >= 0 and right < seq and boundary[left] and boundary[right]:
                for rel in range(min(end - start, max_span_len)):
                    expected_sbo.append((row, left, right, rel, ids[row, start + rel]))
                    row_sbo += 1
        assert mid_word_ends <= 1, f"row {row}: {mid_word_ends} merged spans end inside a word"
        sbo_per_row.append(row_sbo)
    expected = np.array(expected_sbo, dtype=np.int64).reshape(-1, 5)
    if not np.array_equal(sbo, expected):
        assert sbo.shape == expected.shape, f"{len(sbo)} SBO targets, expected {len(expected)}"
        first = np.flatnonzero((sbo != expected).any(1))[0]
        raise AssertionError(f"SBO target {first} is {sbo[first].tolist()}, expected "
                             f"{expected[first].tolist()} {SBO_TARGET_FIELDS}")
    if len(sbo):
        assert sbo[:, 3].max() < max_span_len
    return {"lengths": np.array(lengths), "modes": np.array(modes),
            "sbo_per_row": np.array(sbo_per_row), "masked_per_row": counts}


def run_reference(input_ids, attention_mask, masker: SpanMasker, offsets, word_starts=None):
    return reference_span_masking(
        input_ids.numpy(), None if attention_mask is None else attention_mask.numpy(),
        mask_token_id=masker.mask_token_id, vocab_size=masker.vocab_size,
        is_continuation=None if masker.is_continuation is None else masker.is_continuation.numpy(),
        word_starts=None if word_starts is None else word_starts.numpy(),
        special_token_ids=masker.special_token_ids, mask_ratio=masker.mask_ratio,
        geometric_p=masker.geometric_p, max_span_words=masker.max_span_words,
        max_span_len=masker.max_span_len, replace_probs=masker.replace_probs,
        unigram=None if masker.unigram is None else masker.unigram.numpy(),
        seed=masker.seed, offsets=np.asarray(offsets),
        sbo_special_boundaries=masker.sbo_special_boundaries)


def _skip_reason() -> Optional[str]:
    for variable in (_C.SKIP_ENV, _C.DISABLE_ENV):
        if os.environ.get(variable) == "1":
            return f"{variable}=1: the compiled extension is not used in this run"
    return None


@pytest.fixture
def native():
    """Fails (not skips) when the extension is missing: this machine kind builds it."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    assert _C.extension_available(), _C.extension_load_error()
    return masking.load_native_ops()


# --------------------------------------------------------------------------- RNG


def test_philox_known_answers(native):
    # Random123's kat_vectors for philox4x32-10: (counter, key) -> output.
    cases = [
        ([0, 0, 0, 0], [0, 0], [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]),
        ([0xFFFFFFFF] * 4, [0xFFFFFFFF] * 2, [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]),
        ([0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344], [0xA4093822, 0x299F31D0],
         [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]),
    ]
    counter = torch.tensor([c for c, _, _ in cases])
    key = torch.tensor([k for _, k, _ in cases])
    assert native.philox4x32_10(counter, key).tolist() == [e for _, _, e in cases]


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("seq", [7, 127, 513])
@pytest.mark.parametrize("mask_ratio", [0.15, 0.4])
def test_invariants_native(native, seq, mask_ratio):
    input_ids, attention_mask = make_batch(64, seq, seed=seq)
    masker = make_masker(mask_ratio=mask_ratio)
    out = masker(input_ids, attention_mask)
    assert isinstance(out, SpanMaskingOutput)
    check_masking(input_ids, attention_mask, out, mask_ratio=mask_ratio)


@pytest.mark.parametrize("seq", [7, 127])
def test_invariants_reference(seq):
    input_ids, attention_mask = make_batch(32, seq, seed=seq)
    masker = make_masker()
    out = run_reference(input_ids, attention_mask, masker, offsets=np.arange(32))
    check_masking(input_ids, attention_mask, out)


def _block_rows(batch: int, block_len: int, seed: int) -> torch.Tensor:
    """(batch, block_len + 2) rows ``[CLS] block [SEP]`` of random non-special ids."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(len(SPECIAL_IDS), VOCAB_SIZE, (batch, block_len + 2), generator=generator)
    ids[:, 0], ids[:, -1] = CLS, SEP
    return ids


@pytest.mark.parametrize("implementation", ["native", "reference"])
def test_sbo_targets_need_block_tokens_on_both_sides_as_in_the_original(implementation, request):
    """The original SpanBERT (fairseq fork, data/masking.py and
    data/no_nsp_span_bert_dataset.py) masks a block of sentence tokens *before* it wraps the
    block in [CLS] ... [SEP], and a merged span gets span-boundary targets only when its
    first token is not the block's first token and its last token is not the block's last
    one: both outer neighbours are block tokens, never [CLS] or [SEP]. After wrapping, the
    neighbour indices are shifted by one. Here: with the default, no SBO target may have a
    special token as ``left`` or ``right``, and every masked span touching [CLS]/[SEP] has
    none; ``sbo_special_boundaries=True`` (our former rule) adds exactly those spans."""
    ids = _block_rows(64, 30, seed=40)  # short blocks: many spans touch [CLS]/[SEP]
    mask = torch.ones_like(ids, dtype=torch.bool)
    outputs = {}
    for option in (False, True):
        masker = make_masker(sbo_special_boundaries=option)
        if implementation == "native":
            request.getfixturevalue("native")
            out = masker(ids, mask)
        else:
            out = run_reference(ids, mask, masker, offsets=np.arange(len(ids)))
        check_masking(ids, mask, out, sbo_special_boundaries=option)
        outputs[option] = out
    original, with_specials = (torch.as_tensor(outputs[k][2]) for k in (False, True))
    boundary_ids = torch.cat([ids[original[:, 0], original[:, 1]],
                              ids[original[:, 0], original[:, 2]]])
    assert not torch.isin(boundary_ids, torch.tensor([CLS, SEP])).any()
    # Same masks either way; only the targets of spans at the block's edges differ.
    assert torch.equal(torch.as_tensor(outputs[False][1]), torch.as_tensor(outputs[True][1]))
    at_edge = (with_specials[:, 1] == 0) | (with_specials[:, 2] == ids.shape[1] - 1)
    assert at_edge.any(), "the test blocks must have spans at the edges"
    assert torch.equal(with_specials[~at_edge], original)


def test_explicit_word_starts_and_no_table(native):
    input_ids, attention_mask = make_batch(48, 64, seed=5)
    generator = torch.Generator().manual_seed(6)
    word_starts = torch.rand(48, 64, generator=generator) < 0.6
    masker = make_masker()
    out = masker(input_ids, attention_mask, word_starts)
    check_masking(input_ids, attention_mask, out, word_starts=word_starts.numpy())
    # No table and no word_starts: every piece starts a word.
    plain = make_masker(is_continuation=None)
    check_masking(input_ids, attention_mask, plain(input_ids, attention_mask),
                  is_continuation=None)


def test_long_merged_spans_get_truncated_sbo_targets(native):
    # max_span_len 3 and long spans: tokens at rel_pos >= 3 keep their MLM labels, no SBO.
    input_ids, attention_mask = make_batch(64, 200, seed=8, min_length=150)
    masker = make_masker(max_span_len=3, mask_ratio=0.5)
    out = masker(input_ids, attention_mask)
    stats = check_masking(input_ids, attention_mask, out, mask_ratio=0.5, max_span_len=3)
    assert (stats["lengths"] > 3).any()
    assert int(out.sbo_targets[:, 3].max()) == 2


def test_lengths_argument_equals_attention_mask(native):
    input_ids, attention_mask = make_batch(16, 50, seed=9)
    offsets = list(range(100, 116))
    by_mask = make_masker()(input_ids, attention_mask, offsets=offsets)
    by_lengths = make_masker()(input_ids, offsets=offsets, lengths=attention_mask.sum(1))
    for a, b in zip(by_mask, by_lengths):
        assert torch.equal(a, b)


def test_output_feeds_the_pretraining_model(native):
    from spanbert_fast import SpanBertForPreTraining

    config = SpanBertConfig.tiny(vocab_size=VOCAB_SIZE)
    model = SpanBertForPreTraining(config, backend="torch").eval()
    input_ids, attention_mask = make_batch(4, 40, seed=10, min_length=20)
    out = make_masker(max_span_len=config.sbo_max_targets)(input_ids, attention_mask)
    result = model(out.input_ids, attention_mask.long(), labels=out.labels,
                   sbo_targets=out.sbo_targets)
    assert torch.isfinite(result.loss)


# --------------------------------------------------------------------------- determinism


def test_same_seed_and_offset_same_output_different_offsets_differ(native):
    input_ids, attention_mask = make_batch(32, 128, seed=11, min_length=64)
    offsets = torch.arange(1000, 1032)
    first = make_masker()(input_ids, attention_mask, offsets=offsets)
    second = make_masker()(input_ids, attention_mask, offsets=offsets)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    shifted = make_masker()(input_ids, attention_mask, offsets=offsets + 32)
    rows_equal = (shifted.labels == first.labels).all(1)
    assert int(rows_equal.sum()) <= 1, "different offsets must give different masks"
    reseeded = make_masker(seed=99)(input_ids, attention_mask, offsets=offsets)
    assert int((reseeded.labels == first.labels).all(1).sum()) <= 1


def test_a_sequence_is_masked_the_same_in_any_batch(native):
    # The same sequence, alone and inside batches of other widths and row orders.
    input_ids, attention_mask = make_batch(12, 90, seed=12, min_length=60)
    masker = make_masker()
    row, offset = 5, 777
    length = int(attention_mask[row].sum())
    alone = masker(input_ids[row:row + 1, :length], offsets=[offset])
    for width, position in ((length, 0), (90, 5), (300, 11)):
        batch_ids = torch.full((12, width), PAD)
        batch_mask = torch.zeros((12, width), dtype=torch.bool)
        others = [r for r in range(12) if r != row]
        order = others[:position] + [row] + others[position:]
        for slot, source in enumerate(order):
            n = min(int(attention_mask[source].sum()), width)
            batch_ids[slot, :n] = input_ids[source, :n]
            batch_mask[slot, :n] = True
        offsets = torch.arange(12) + 5000
        offsets[position] = offset
        out = masker(batch_ids, batch_mask, offsets=offsets)
        assert torch.equal(out.input_ids[position, :length], alone.input_ids[0])
        assert torch.equal(out.labels[position, :length], alone.labels[0])
        assert (out.labels[position, length:] == IGNORE_INDEX).all()
        mine = out.sbo_targets[out.sbo_targets[:, 0] == position]
        expected = alone.sbo_targets.clone()
        expected[:, 0] = position
        # Alone, the row has no real token after its [SEP]; in a wider batch it has none
        # either (padding), so the targets agree exactly.
        assert torch.equal(mine, expected)


def test_counter_advances_and_state_dict_resumes(native):
    input_ids, attention_mask = make_batch(8, 64, seed=13, min_length=32)
    masker = make_masker()
    first = masker(input_ids, attention_mask)
    assert masker.sequences_seen == 8
    state = masker.state_dict()
    second = masker(input_ids, attention_mask)
    assert not torch.equal(first.labels, second.labels), "consecutive batches must differ"
    explicit = make_masker()(input_ids, attention_mask, offsets=list(range(8, 16)))
    assert torch.equal(second.labels, explicit.labels)
    resumed = make_masker(seed=5)
    resumed.load_state_dict(state)
    again = resumed(input_ids, attention_mask)
    for a, b in zip(second, again):
        assert torch.equal(a, b)
    assert resumed.state_dict() == {"seed": 1234, "sequences_seen": 16}


def test_reference_is_reproducible_and_batch_independent():
    input_ids, attention_mask = make_batch(6, 40, seed=14, min_length=20)
    masker = make_masker()
    full = run_reference(input_ids, attention_mask, masker, offsets=np.arange(6) + 50)
    again = run_reference(input_ids, attention_mask, masker, offsets=np.arange(6) + 50)
    single = run_reference(input_ids[3:4], attention_mask[3:4], masker, offsets=[53])
    for a, b in zip(full, again):
        assert np.array_equal(a, b)
    assert np.array_equal(full[1][3], single[1][0])


# --------------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("shape", [(0, 0), (0, 16), (3, 0)])
def test_empty_batches(native, shape):
    input_ids = torch.empty(shape, dtype=torch.int64)
    out = make_masker()(input_ids, torch.ones(shape, dtype=torch.bool))
    assert out.input_ids.shape == out.labels.shape == shape
    assert out.sbo_targets.shape == (0, 5) and out.sbo_targets.dtype == torch.int64


def test_short_special_padding_and_empty_rows(native):
    ids = torch.tensor([
        [CLS, 10, SEP, PAD, PAD, PAD],    # one maskable token: budget ceil(0.15) = 1
        [CLS, SEP, SEP, CLS, MASK, PAD],  # all special
        [PAD] * 6,                        # length 0
        [10, 11, 12, 13, 14, 15],         # shorter than most spans, no specials
        [CLS, 20, 21, SEP, PAD, PAD],
    ])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0], [0] * 6, [1] * 6,
                         [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    for ratio in (0.0, 0.15, 1.0):
        masker = make_masker(mask_ratio=ratio, replace_probs=(1.0, 0.0, 0.0))
        out = masker(ids, mask)
        check_masking(ids, mask, out, mask_ratio=ratio)
        assert (out.labels[1:3] == IGNORE_INDEX).all()
        if ratio == 1.0:
            maskable = mask & ~torch.isin(ids, torch.tensor(SPECIAL_IDS))
            assert torch.equal(out.labels != IGNORE_INDEX, maskable)
            # Row 0: [CLS] x [SEP]: both boundaries are special, so no target (the
            # original's rule) unless special boundaries are allowed.
            assert not (out.sbo_targets[:, 0] == 0).any()
            with_specials = make_masker(mask_ratio=ratio, replace_probs=(1.0, 0.0, 0.0),
                                        sbo_special_boundaries=True)(ids, mask)
            check_masking(ids, mask, with_specials, mask_ratio=ratio, sbo_special_boundaries=True)
            assert (with_specials.sbo_targets[with_specials.sbo_targets[:, 0] == 0].tolist()
                    == [[0, 0, 2, 0, 10]])
            # Row 3 is all masked: no boundary inside the row, no SBO target.
            assert not (out.sbo_targets[:, 0] == 3).any()
        if ratio == 0.0:
            assert (out.labels == IGNORE_INDEX).all() and torch.equal(out.input_ids, ids)
            assert out.sbo_targets.shape == (0, 5)


def test_ratio_one_masks_every_maskable_token_of_long_rows(native):
    input_ids, attention_mask = make_batch(32, 256, seed=15)
    out = make_masker(mask_ratio=1.0)(input_ids, attention_mask)
    check_masking(input_ids, attention_mask, out, mask_ratio=1.0)


def test_non_contiguous_and_int32_inputs(native):
    input_ids, attention_mask = make_batch(16, 64, seed=16)
    offsets = torch.arange(16)
    expected = make_masker()(input_ids, attention_mask, offsets=offsets)
    ids_t = input_ids.t().contiguous().t()  # same values, column-major strides
    assert not ids_t.is_contiguous()
    got = make_masker()(ids_t, attention_mask.t().contiguous().t(), offsets=offsets)
    got32 = make_masker()(input_ids.int(), attention_mask.int(), offsets=offsets)
    for a, b, c in zip(expected, got, got32):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_non_contiguous_integer_mask_is_read_row_major_by_the_native_ops(native):
    """The ops turned an integer mask into bool with ``ne(0)``, which keeps a transposed
    mask's strides, and the kernels read it row-major: ``word_starts`` marked padded
    positions and the raw op put labels on padding. (SpanMasker converts the mask to bool
    in Python first, so it was not affected.)"""
    input_ids, attention_mask = make_batch(8, 40, seed=21)
    int_mask = attention_mask.long()
    transposed = int_mask.t().contiguous().t()
    assert not transposed.is_contiguous() and torch.equal(transposed, int_mask)
    assert torch.equal(masking.word_starts(input_ids, IS_CONTINUATION, transposed),
                       masking.word_starts(input_ids, IS_CONTINUATION, int_mask))
    masker = make_masker()

    def run(mask):
        return native.span_masking(input_ids, masker._token_flags, mask, None, torch.arange(8),
                                   None, 7, MASK, 3, 20, masker._span_word_thresholds,
                                   *masker._replace_thresholds, 15)

    for got, want in zip(run(transposed), run(int_mask)):
        assert torch.equal(got, want)


def test_empty_batch_by_lengths_list(native):
    out = make_masker()(torch.empty((0, 16), dtype=torch.int64), lengths=[])
    assert out.labels.shape == (0, 16) and out.sbo_targets.shape == (0, 5)


def test_a_batch_that_raised_does_not_use_up_the_counter(native):
    """The counter moved before the op checked the ids, so a batch retried after a caught
    error was masked with other offsets than it would have been the first time."""
    input_ids, attention_mask = make_batch(4, 32, seed=22, min_length=16)
    bad = input_ids.clone()
    bad[1, 3] = VOCAB_SIZE
    masker = make_masker()
    with pytest.raises(ValueError, match="input_ids must be in"):
        masker(bad, attention_mask)
    assert masker.sequences_seen == 0
    retried = masker(input_ids, attention_mask)
    first_time = make_masker()(input_ids, attention_mask)
    assert masker.sequences_seen == 4
    for a, b in zip(retried, first_time):
        assert torch.equal(a, b)

    collate = SpanMaskingCollator(make_masker(), pad_token_id=PAD)
    with pytest.raises(ValueError, match="input_ids must be in"):
        collate([[CLS, 5, SEP], [CLS, VOCAB_SIZE, SEP]])
    assert collate.masker.sequences_seen == 0
    collate([[CLS, 5, SEP], {"input_ids": [CLS, 6, SEP], "index": 9}])
    assert collate.masker.sequences_seen == 1


def test_unpadded_input_without_mask_treats_every_position_as_real(native):
    input_ids, _ = make_batch(8, 32, seed=17, min_length=32)
    out = make_masker()(input_ids)
    check_masking(input_ids, None, out)


def test_opcheck(native):
    input_ids, attention_mask = make_batch(3, 19, seed=18)
    masker = make_masker(unigram=torch.rand(VOCAB_SIZE))
    flags = masker._token_flags
    for mask, cdf in ((attention_mask, None), (None, masker._unigram_cdf)):
        arguments = (input_ids, flags, mask, None, torch.arange(3), cdf, 7, MASK, 3, 20,
                     masker._span_word_thresholds, *masker._replace_thresholds, 15)
        torch.library.opcheck(native.span_masking.default, arguments)
    torch.library.opcheck(native.sample_span_lengths.default,
                          (3, torch.arange(4), 5, masker._span_word_thresholds))


# --------------------------------------------------------------------------- collator


def test_collator_pads_masks_and_uses_indices(native):
    masker = make_masker()
    collate = SpanMaskingCollator(masker, pad_token_id=PAD, pad_to_multiple_of=8)
    generator = torch.Generator().manual_seed(19)
    sequences = [[CLS] + torch.randint(4, VOCAB_SIZE, (n,), generator=generator).tolist() + [SEP]
                 for n in (30, 5, 0, 17)]
    examples = [{"input_ids": s, "index": 40 + k} for k, s in enumerate(sequences)]
    batch = collate(examples)
    assert set(batch) == {"input_ids", "attention_mask", "labels", "sbo_targets"}
    assert batch["input_ids"].shape == (4, 32) and batch["attention_mask"].dtype == torch.int64
    assert batch["attention_mask"].sum(1).tolist() == [32, 7, 2, 19]
    assert masker.sequences_seen == 0, "indices, not the counter, key the examples"
    padded = torch.full((4, 32), PAD)
    for row, s in enumerate(sequences):
        padded[row, :len(s)] = torch.tensor(s)
    direct = make_masker()(padded, batch["attention_mask"], offsets=[40, 41, 42, 43])
    assert torch.equal(batch["input_ids"], direct.input_ids)
    assert torch.equal(batch["labels"], direct.labels)
    assert torch.equal(batch["sbo_targets"], direct.sbo_targets)
    check_masking(padded, batch["attention_mask"], (batch["input_ids"], batch["labels"],
                                                    batch["sbo_targets"]))

    # Plain lists, tensors and arrays: the running counter.
    plain = collate([sequences[0], torch.tensor(sequences[1]), np.array(sequences[3])])
    assert masker.sequences_seen == 3 and plain["input_ids"].shape == (3, 32)
    loader = torch.utils.data.DataLoader(sequences, batch_size=2, collate_fn=collate)
    assert [b["input_ids"].shape[0] for b in loader] == [2, 2]


def test_collator_accepts_any_mapping_such_as_batch_encoding(native):
    """Issue 18.10: transformers' BatchEncoding (a UserDict, not a dict) was refused with
    "must be a sequence of ids or a dict". Any Mapping is an example; its attention_mask,
    when there is one, says which ids are padding (a tokenizer that padded each example)."""
    import types

    transformers = pytest.importorskip("transformers")
    generator = torch.Generator().manual_seed(23)
    sequences = [[CLS] + torch.randint(4, VOCAB_SIZE, (n,), generator=generator).tolist() + [SEP]
                 for n in (9, 3, 14)]
    expected = SpanMaskingCollator(make_masker(), pad_token_id=PAD)(
        [{"input_ids": s, "index": k} for k, s in enumerate(sequences)])

    width = 20  # as a tokenizer with padding="max_length" would give
    padded_encodings = [
        transformers.BatchEncoding({"input_ids": s + [PAD] * (width - len(s)),
                                    "token_type_ids": [0] * width,
                                    "attention_mask": [1] * len(s) + [0] * (width - len(s)),
                                    "index": k})
        for k, s in enumerate(sequences)]
    others = [types.MappingProxyType({"input_ids": sequences[0], "index": 0}),
              transformers.BatchEncoding({"input_ids": torch.tensor(sequences[1]), "index": 1}),
              {"input_ids": np.array(sequences[2]), "attention_mask": None, "index": 2}]
    for examples in (padded_encodings, others):
        got = SpanMaskingCollator(make_masker(), pad_token_id=PAD)(examples)
        for key in expected:
            assert torch.equal(got[key], expected[key]), key

    with pytest.raises(ValueError, match=r"examples\[0\] is a BatchEncoding without 'input_ids'"):
        SpanMaskingCollator(make_masker())([transformers.BatchEncoding({"ids": [1]})])
    with pytest.raises(ValueError, match=r"examples\[0\]\['attention_mask'\] has 2 entries "
                                         r"but its 'input_ids' has 3"):
        SpanMaskingCollator(make_masker())([{"input_ids": [1, 5, 2], "attention_mask": [1, 1]}])


def test_collator_bad_examples():
    collate = SpanMaskingCollator(make_masker())
    with pytest.raises(ValueError, match=r"examples\[1\] is a dict without 'input_ids'"):
        collate([{"input_ids": [1, 5]}, {"ids": [1]}])
    with pytest.raises(TypeError, match=r"examples\[0\]\[1\] must be an int id"):
        collate([[1, 2.5]])
    with pytest.raises(ValueError, match=r"input_ids must be in \[0, 1000\)"):
        collate([[1, 5000]])
    with pytest.raises(TypeError, match="masker must be a SpanMasker"):
        SpanMaskingCollator("masker")
    with pytest.raises(ValueError, match="pad_token_id must be in"):
        SpanMaskingCollator(make_masker(), pad_token_id=VOCAB_SIZE)


# --------------------------------------------------------------------------- bad input


CONSTRUCTOR_ERRORS = [
    (dict(mask_token_id=VOCAB_SIZE), ValueError, "mask_token_id must be in [0, 999]"),
    (dict(mask_token_id=1.5), TypeError, "mask_token_id must be an int"),
    (dict(vocab_size=0), ValueError, "vocab_size must be in"),
    (dict(is_continuation=IS_CONTINUATION[:-1]), ValueError,
     "is_continuation must be 1-D with vocab_size = 1000 entries"),
    (dict(is_continuation=IS_CONTINUATION.long()), TypeError, "is_continuation must be bool"),
    (dict(special_token_ids=[5, VOCAB_SIZE]), ValueError, "special_token_ids[1] must be in"),
    (dict(mask_ratio=1.5), ValueError, "mask_ratio must be in [0, 1]"),
    (dict(mask_ratio=float("nan")), ValueError, "mask_ratio must be finite"),
    (dict(mask_ratio="0.15"), TypeError, "mask_ratio must be a real number"),
    (dict(geometric_p=0.0), ValueError, "geometric_p must be in (0, 1]"),
    (dict(max_span_words=0), ValueError, "max_span_words must be in [1, 64]"),
    (dict(max_span_words=65), ValueError, "max_span_words must be in [1, 64]"),
    (dict(max_span_len=0), ValueError, "max_span_len must be >= 1, got 0"),
    (dict(sbo_special_boundaries=1), TypeError, "sbo_special_boundaries must be a bool"),
    (dict(replace_probs=(0.8, 0.1)), ValueError, "replace_probs must be 3 probabilities"),
    (dict(replace_probs=(0.8, 0.1, 0.2)), ValueError, "replace_probs must sum to 1"),
    (dict(replace_probs=(1.2, -0.1, -0.1)), ValueError, "replace_probs[0] must be in [0, 1]"),
    (dict(unigram=torch.ones(5)), ValueError, "unigram must be 1-D with vocab_size = 1000"),
    (dict(unigram=-torch.ones(VOCAB_SIZE)), ValueError, "unigram must hold finite, non-negative"),
    (dict(unigram=torch.zeros(VOCAB_SIZE)), ValueError, "unigram must have a positive sum"),
    (dict(seed=-1), ValueError, "seed must be in"),
]


@pytest.mark.parametrize("changes, error, text", CONSTRUCTOR_ERRORS,
                         ids=[next(iter(c[0])) + str(i) for i, c in enumerate(CONSTRUCTOR_ERRORS)])
def test_bad_constructor_arguments(changes, error, text):
    with pytest.raises(error, match=re.escape(text)):
        make_masker(**changes)


def _call_errors():
    ids, mask = make_batch(2, 7, seed=20, min_length=7)
    return [
        ("float ids", (ids.float(), mask), {}, TypeError, "input_ids must be int64 or int32"),
        ("list ids", (ids.tolist(), mask), {}, TypeError, "input_ids must be a torch.Tensor"),
        ("1-D ids", (ids[0], None), {}, ValueError, "input_ids must be 2-D (batch, seq)"),
        ("id too large", (ids.index_fill(1, torch.tensor([3]), VOCAB_SIZE), mask), {},
         ValueError, "input_ids must be in [0, 1000) (vocab_size), got 1000 at position (0, 3)"),
        ("negative id", (ids.index_fill(1, torch.tensor([6]), -1), mask), {}, ValueError,
         "got -1 at position (0, 6)"),
        ("mask shape", (ids, mask[:, :-1]), {}, ValueError,
         "attention_mask must have the shape of input_ids"),
        ("float mask", (ids, mask.float()), {}, TypeError,
         "attention_mask must be bool or an integer"),
        ("int word starts", (ids, mask, mask.long()), {}, TypeError, "word_starts must be bool"),
        ("meta mask", (ids, mask.to("meta")), {}, ValueError,
         "attention_mask must be on the device of input_ids"),
        ("offsets shape", (ids, mask), dict(offsets=[1, 2, 3]), ValueError,
         "offsets must have shape (2,)"),
        ("float offsets", (ids, mask), dict(offsets=torch.ones(2)), TypeError,
         "offsets must be integers"),
        ("mask and lengths", (ids, mask), dict(lengths=[1, 2]), ValueError,
         "give attention_mask or lengths, not both"),
        ("lengths too long", (ids,), dict(lengths=[1, 9]), ValueError, "lengths must be in [0, 7]"),
        ("ids on another device", (ids.to("meta"),), {}, ValueError,
         "but the masker's tables (is_continuation, special_token_ids, unigram) are on cpu"),
    ]


@pytest.mark.parametrize("case, args, kwargs, error, text", _call_errors(),
                         ids=[c[0] for c in _call_errors()])
def test_bad_call_arguments(case, args, kwargs, error, text):
    with pytest.raises(error, match=re.escape(text)):
        make_masker()(*args, **kwargs)


def test_native_op_checks_its_inputs(native):
    ids, mask = make_batch(2, 7, seed=21, min_length=7)
    masker = make_masker()
    good = dict(input_ids=ids, token_flags=masker._token_flags, attention_mask=mask,
                word_starts=None, offsets=torch.arange(2), unigram_cdf=None, seed=1,
                mask_token_id=MASK, mask_ratio_numerator=3, mask_ratio_denominator=20,
                span_word_thresholds=masker._span_word_thresholds,
                mask_threshold=masker._replace_thresholds[0],
                random_threshold=masker._replace_thresholds[1], max_span_len=15)
    # (changes, error, text): typed errors (TORCH_CHECK_TYPE / TORCH_CHECK_VALUE) that
    # reach Python through the dispatcher as TypeError / ValueError.
    cases = [
        (dict(input_ids=ids.int()), TypeError, "input_ids must be int64"),
        (dict(input_ids=ids[0], attention_mask=None), ValueError,
         "input_ids must be 2-D (batch, seq)"),
        (dict(input_ids=ids.index_fill(1, torch.tensor([4]), VOCAB_SIZE)), ValueError,
         "input_ids must be in [0, 1000) (vocab_size), got 1000 at position (0, 4)"),
        (dict(token_flags=masker._token_flags.bool()), TypeError, "token_flags must be uint8"),
        (dict(token_flags=masker._token_flags[None]), ValueError,
         "token_flags must be 1-D (vocab_size,)"),
        (dict(token_flags=masker._token_flags.to("meta")), ValueError,
         "token_flags must be on the device"),
        (dict(attention_mask=mask[:, 1:]), ValueError,
         "attention_mask must have the shape of input_ids"),
        (dict(attention_mask=mask.float()), TypeError,
         "attention_mask must be bool or an integer dtype"),
        (dict(word_starts=mask.long()), TypeError, "word_starts must be bool"),
        (dict(word_starts=mask[:, 1:]), ValueError, "word_starts must have the shape of input_ids"),
        (dict(offsets=torch.arange(3)), ValueError, "offsets must be 1-D (batch,) = (2,)"),
        (dict(offsets=torch.arange(2).int()), TypeError, "offsets must be int64"),
        (dict(unigram_cdf=torch.arange(VOCAB_SIZE).int()), TypeError, "unigram_cdf must be int64"),
        (dict(unigram_cdf=torch.arange(5)), ValueError,
         "unigram_cdf must be 1-D (vocab_size,) = (1000,)"),
        (dict(unigram_cdf=torch.arange(VOCAB_SIZE)), ValueError, "unigram_cdf must end at 2^32"),
        (dict(seed=-3), ValueError, "seed must be >= 0"),
        (dict(mask_token_id=VOCAB_SIZE), ValueError, "mask_token_id must be in [0, 1000)"),
        (dict(mask_ratio_numerator=21), ValueError, "the mask ratio must be a fraction"),
        (dict(mask_ratio_denominator=0), ValueError, "the mask ratio must be a fraction"),
        (dict(span_word_thresholds=[5, 3]), ValueError,
         "span_word_thresholds must be non-decreasing"),
        (dict(span_word_thresholds=[1] * 64), ValueError,
         "span_word_thresholds must have max_span_words - 1"),
        (dict(mask_threshold=1 << 33), ValueError, "mask_threshold must be in [0, 2^32]"),
        (dict(random_threshold=0), ValueError, "random_threshold (cumulative"),
        (dict(max_span_len=0), ValueError, "max_span_len must be >= 1"),
    ]
    for changes, error, text in cases:
        arguments = dict(good, **changes)
        with pytest.raises(error, match=re.escape(text)) as caught:
            native.span_masking(*arguments.values())
            pytest.fail(f"no error for {changes}")
        assert "Exception raised from" not in str(caught.value), changes


@pytest.mark.parametrize("value, column", [(VOCAB_SIZE, 3), (-1, 6)])
def test_native_id_range_error_is_the_maskers_own(native, value, column):
    """The op raises SpanMasker's ValueError itself, word for word (TORCH_CHECK_VALUE), so the
    masker passes it on untouched instead of parsing a RuntimeError's text."""
    ids, mask = make_batch(2, 7, seed=20, min_length=7)
    ids = ids.index_fill(1, torch.tensor([column]), value)
    masker = make_masker()
    with pytest.raises(ValueError) as from_python:  # the check of the fallback path
        masker._check_id_range(ids)
    with pytest.raises(ValueError) as from_op:
        native.span_masking(ids, masker._token_flags, mask, None, torch.arange(2), None, 1, MASK,
                            3, 20, masker._span_word_thresholds, *masker._replace_thresholds, 15)
    assert str(from_op.value) == str(from_python.value)
    with pytest.raises(ValueError) as from_masker:
        masker(ids, mask)
    assert str(from_masker.value) == str(from_python.value)
    assert from_masker.value.__context__ is None  # raised by the op, not rewritten on the way


# --------------------------------------------------------------------------- fallback


_FALLBACK_SCRIPT = """
    import json, warnings
    import torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        from spanbert_fast import _C
        from spanbert_fast.masking import SpanMasker
        ids = torch.randint(4, 50, (6, 40), generator=torch.Generator().manual_seed(0))
        ids[:, 0] = 1
        masker = SpanMasker(3, 50, special_token_ids=[0, 1, 2, 3], seed=4)
        first = masker(ids, offsets=list(range(6)))
        again = SpanMasker(3, 50, special_token_ids=[0, 1, 2, 3], seed=4)
        second = again(ids, offsets=list(range(6)))
    print(json.dumps({
        "available": _C.extension_available(),
        "masked": (first.labels != -100).sum(1).tolist(),
        "same": all(torch.equal(a, b) for a, b in zip(first, second)),
        "sbo_columns": first.sbo_targets.shape[1],
        "warnings": [str(w.message) for w in caught if "spanbert_fast" in str(w.message)],
    }))
"""


def test_fallback_without_extension_uses_the_reference():
    env = {k: v for k, v in os.environ.items() if k not in (_C.SKIP_ENV, _C.DISABLE_ENV)}
    env[_C.DISABLE_ENV] = "1"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(_FALLBACK_SCRIPT)],
                            capture_output=True, text=True, env=env, cwd=REPO_ROOT.parent,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert not report["available"]
    assert len(report["warnings"]) == 1
    assert "SPANBERT_FAST_DISABLE_EXTENSION" in report["warnings"][0]
    assert report["masked"] == [6] * 6  # ceil(0.15 x 39)
    assert report["same"] and report["sbo_columns"] == 5


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cuda_matches_cpu_bit_for_bit(native):
    if not _C.load_extension().with_cuda:
        pytest.fail("this extension was built without CUDA kernels on a machine with a GPU")
    input_ids, attention_mask = make_batch(4096, 512, seed=22)
    generator = torch.Generator().manual_seed(23)
    offsets = torch.randint(0, 1 << 62, (4096,), generator=generator)
    for overrides in ({}, {"unigram": torch.rand(VOCAB_SIZE, generator=generator)},
                      {"mask_ratio": 1.0, "max_span_len": 4}):
        masker = make_masker(**overrides)
        on_cpu = masker(input_ids, attention_mask, offsets=offsets)
        masker.to("cuda")
        on_gpu = masker(input_ids.cuda(), attention_mask.cuda(), offsets=offsets.cuda())
        for name, a, b in zip(SpanMaskingOutput._fields, on_cpu, on_gpu):
            assert b.is_cuda
            differ = (a != b.cpu()).nonzero()
            assert differ.numel() == 0, (
                f"{overrides}: {name} differs at {len(differ)} places, first {differ[0].tolist()}")
    with pytest.raises(ValueError, match="call masker.to"):
        make_masker()(input_ids.cuda())


def _cpu_and_cuda(masker, input_ids, attention_mask=None, word_starts=None, offsets=None):
    on_cpu = masker(input_ids, attention_mask, word_starts, offsets)
    masker.to("cuda")
    try:
        moved = [None if t is None else torch.as_tensor(t).cuda()
                 for t in (input_ids, attention_mask, word_starts, offsets)]
        on_gpu = masker(*moved)
    finally:
        masker.to("cpu")
    return on_cpu, on_gpu


@pytest.mark.gpu
def test_cuda_matches_cpu_on_edge_shapes_and_options(native):
    """The cases the 4096 x 512 test leaves out: batch 1, long rows, all-padding rows,
    explicit word_starts, a mask given as int, seq 0; and word_starts() itself."""
    ids_long, mask_long = make_batch(3, 3000, seed=24)
    ids, mask = make_batch(16, 64, seed=25)
    mask[3] = False  # a row of padding only
    ids[3] = PAD
    starts = torch.rand(16, 64, generator=torch.Generator().manual_seed(26)) < 0.6
    cases = {
        "batch 1": (ids[:1], mask[:1], None),
        "seq 3000": (ids_long, mask_long, None),
        "all-padding row, int mask": (ids, mask.int(), None),
        "explicit word_starts": (ids, mask, starts),
        "seq 0": (torch.empty(4, 0, dtype=torch.long), None, None),
    }
    for label, (input_ids, attention_mask, word_starts) in cases.items():
        for option in (False, True):
            on_cpu, on_gpu = _cpu_and_cuda(make_masker(sbo_special_boundaries=option),
                                           input_ids, attention_mask, word_starts,
                                           torch.arange(input_ids.shape[0]) + 7)
            for name, a, b in zip(SpanMaskingOutput._fields, on_cpu, on_gpu):
                assert torch.equal(a, b.cpu()), (
                    f"{label}, sbo_special_boundaries={option}: {name} differs")
    got = masking.word_starts(ids.cuda(), IS_CONTINUATION.cuda(), mask.int().cuda())
    assert torch.equal(got.cpu(), masking.word_starts(ids, IS_CONTINUATION, mask.int()))


@pytest.mark.gpu
def test_cuda_reports_a_bad_id_at_its_position_and_uses_the_current_stream(native):
    ids, mask = make_batch(8, 32, seed=27, min_length=16)
    ids[5, 9] = VOCAB_SIZE + 3
    masker = make_masker().to("cuda")
    with pytest.raises(ValueError, match=r"got 1003 at position \(5, 9\)"):
        masker(ids.cuda(), mask.cuda())
    ids[5, 9] = 7
    expected = make_masker()(ids, mask, offsets=torch.arange(8))
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = masker(ids.cuda(), mask.cuda(), offsets=torch.arange(8).cuda())
    stream.synchronize()
    for name, a, b in zip(SpanMaskingOutput._fields, expected, got):
        assert torch.equal(a, b.cpu()), f"side stream: {name} differs"


@pytest.mark.parametrize("kwargs, text", [
    (dict(mask_token_id=VOCAB_SIZE), "mask_token_id must be in"),
    (dict(special_token_ids=[VOCAB_SIZE]), r"special_token_ids\[0\] must be in"),
    (dict(mask_ratio=1.5), "mask_ratio must be in"),
    (dict(offsets=[0]), r"offsets must have shape \(2,\)"),
    (dict(attention_mask=np.ones((2, 3))), "attention_mask must have the shape of input_ids"),
    (dict(word_starts=np.ones((2, 4), dtype=bool)), "word_starts must have the shape"),
])
def test_reference_checks_its_arguments_like_the_masker(kwargs, text):
    """The oracle wrote an out-of-range mask_token_id into its output and failed on bad
    shapes with NumPy's indexing errors; it now applies SpanMasker's checks."""
    arguments = dict(mask_token_id=MASK, vocab_size=VOCAB_SIZE, special_token_ids=SPECIAL_IDS)
    arguments.update(kwargs)
    ids = np.array([[CLS, 5, 6, 7, SEP], [CLS, 8, 9, 10, SEP]])
    with pytest.raises(ValueError, match=text):
        reference_span_masking(ids, arguments.pop("attention_mask", None), **arguments)


def test_packed_collator_gives_the_layout_the_mask_and_labels_imply(native):
    """Issue 14: packed=True adds the padding-free layout, built on the host from the row
    lengths, and the masked positions; the padded batch is unchanged."""
    generator = torch.Generator().manual_seed(29)
    sequences = [[CLS] + torch.randint(4, VOCAB_SIZE, (n,), generator=generator).tolist() + [SEP]
                 for n in (30, 5, 0, 17)]
    plain = SpanMaskingCollator(make_masker(), pad_token_id=PAD)(sequences)
    batch = SpanMaskingCollator(make_masker(), pad_token_id=PAD, packed=True)(sequences)
    for key in plain:
        assert torch.equal(batch[key], plain[key]), key
    mask = batch["attention_mask"]
    where = batch["unpadded"]
    assert (where.batch, where.seq, where.max_seqlen, where.total_tokens) == (4, 32, 32, 60)
    assert where.cu_seqlens.dtype == torch.int32 and not where.has_filler
    assert where.cu_seqlens.tolist() == [0] + torch.cumsum(
        mask.sum(1), 0).tolist()
    assert torch.equal(where.indices, mask.reshape(-1).nonzero().squeeze(1))
    assert torch.equal(batch["mlm_positions"],
                       (batch["labels"].reshape(-1) != -100).nonzero().squeeze(1))
    moved = where.to("cpu")
    assert torch.equal(moved.indices, where.indices) and moved.max_seqlen == 32


def test_static_shapes_collator_gives_every_batch_the_same_shapes(native):
    static = StaticShapes(batch_size=4, max_length=40, tokens_multiple_of=64)
    collate = SpanMaskingCollator(make_masker(), pad_token_id=PAD, static_shapes=static)
    generator = torch.Generator().manual_seed(31)

    def examples(*lengths):
        return [[CLS] + torch.randint(4, VOCAB_SIZE, (n,), generator=generator).tolist()
                + [SEP] for n in lengths]

    first, second = collate(examples(38, 20, 5, 30)), collate(examples(30, 30, 20))
    for batch in (first, second):
        assert batch["input_ids"].shape == (4, 40)
        assert batch["unpadded"].total_tokens == 128 and batch["unpadded"].has_filler
        assert batch["unpadded"].cu_seqlens.shape == (4 + static.filler_sequences + 1,)
        assert batch["mlm_positions"].shape == (4 * 6,) == (batch["sbo_targets"].shape[0],)
        real = batch["unpadded"].indices < 4 * 40
        assert torch.equal(batch["unpadded"].indices[real],
                           batch["attention_mask"].reshape(-1).nonzero().squeeze(1))
        fillers = batch["sbo_targets"][:, 4] == -100
        assert fillers.any() and (batch["sbo_targets"][fillers, :4] == 0).all()
    assert second["attention_mask"][3].sum() == 0, "the short batch's extra row is empty"
    with pytest.raises(ValueError, match="more than static_shapes.batch_size=4"):
        collate(examples(3, 3, 3, 3, 3))
    with pytest.raises(ValueError, match="more than static_shapes.max_length=40"):
        collate(examples(39))
    with pytest.raises(ValueError, match="pad_to_multiple_of cannot be combined"):
        SpanMaskingCollator(make_masker(), static_shapes=static, pad_to_multiple_of=8)
    with pytest.raises(TypeError, match="static_shapes must be a StaticShapes"):
        SpanMaskingCollator(make_masker(), static_shapes=(4, 40))
    with pytest.raises(ValueError, match="static_shapes.max_length"):
        StaticShapes(batch_size=4, max_length=0)
