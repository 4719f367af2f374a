"""Statistics of the span-masking sampler: span lengths, 80/10/10, random tokens, and the
compiled op against the NumPy reference.

p-values come from the regularised upper incomplete gamma function
(``chi2.sf(x, df) = Q(df / 2, x / 2)``, :func:`torch.special.gammaincc`, the function
``scipy.stats.chi2.sf`` evaluates), so the tests need no SciPy. Every test is seeded: a
threshold such as p > 1e-3 is a check that a correct sampler passes with the seed fixed,
and that a biased one (a wrong table, an off-by-one in the anchor) fails by many orders of
magnitude.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import numpy as np
import pytest
import torch

from spanbert_fast import SpanBertConfig
from spanbert_fast.train import commands
from spanbert_fast.masking import IGNORE_INDEX, SpanMasker, span_length_probabilities
from spanbert_fast.train.pretraining import PretrainOptions
from test_masking import (
    CLS,
    MASK,
    SEP,
    SPECIAL_IDS,
    VOCAB_SIZE,
    check_masking,
    effective_word_starts,
    make_batch,
    make_masker,
    native,  # noqa: F401 - the fixture
    run_reference,
)

P_VALUE_FLOOR = 1e-3


def chi_square_sf(statistic: float, dof: int) -> float:
    """P(chi^2_dof >= statistic)."""
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def goodness_of_fit(counts: np.ndarray, probabilities: np.ndarray) -> float:
    """p-value of Pearson's chi-square test of `counts` against `probabilities`."""
    expected = counts.sum() * np.asarray(probabilities, dtype=np.float64)
    keep = expected > 0
    assert counts[~keep].sum() == 0, "draws in a bin of probability 0"
    statistic = float((((counts - expected) ** 2)[keep] / expected[keep]).sum())
    return chi_square_sf(statistic, int(keep.sum()) - 1)


def homogeneity(counts_a: np.ndarray, counts_b: np.ndarray) -> float:
    """p-value of the chi-square test that two histograms come from one distribution."""
    table = np.stack([counts_a, counts_b]).astype(np.float64)
    table = table[:, table.sum(0) > 0]
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    statistic = float(((table - expected) ** 2 / expected).sum())
    return chi_square_sf(statistic, table.shape[1] - 1)


def assert_means_agree(a: np.ndarray, b: np.ndarray, name: str, z_max: float = 4.0) -> None:
    """Two-sample z-test on the means (the samples are large)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    z = abs(a.mean() - b.mean()) / se
    assert z < z_max, f"{name}: mean {a.mean():.4f} vs {b.mean():.4f} ({z:.1f} standard errors)"


def histogram(values: np.ndarray, top: int) -> np.ndarray:
    """Counts of 1..top-1 and of >= top."""
    return np.bincount(np.minimum(values, top), minlength=top + 1)[1:]


def test_chi_square_sf_matches_known_quantiles():
    # Tabulated upper quantiles of chi^2 with 9 degrees of freedom.
    assert chi_square_sf(16.919, 9) == pytest.approx(0.05, abs=2e-4)
    assert chi_square_sf(27.877, 9) == pytest.approx(0.001, abs=2e-5)
    assert chi_square_sf(3.841, 1) == pytest.approx(0.05, abs=2e-4)


# --------------------------------------------------------------------------- span lengths


@pytest.mark.parametrize("geometric_p, max_span_words, mean", [(0.2, 10, 3.8), (0.5, 4, None),
                                                               (0.05, 64, None)])
def test_drawn_span_lengths_follow_the_clipped_geometric(native, geometric_p, max_span_words, mean):
    masker = make_masker(geometric_p=geometric_p, max_span_words=max_span_words)
    # 100 streams x 1000 draws = 100k lengths, drawn by the sampler's own draw function.
    draws = native.sample_span_lengths(masker.seed, torch.arange(100) * 7919, 1000,
                                       masker._span_word_thresholds).numpy().ravel()
    assert draws.min() >= 1 and draws.max() <= max_span_words
    probabilities = np.array(span_length_probabilities(geometric_p, max_span_words))
    counts = np.bincount(draws, minlength=max_span_words + 1)[1:]
    p_value = goodness_of_fit(counts, probabilities)
    assert p_value > P_VALUE_FLOOR, f"span lengths: chi-square p = {p_value:.2e}, counts {counts}"
    if mean is not None:  # every drawn word is one token when every token starts a word
        assert abs(draws.mean() - mean) < 0.1, f"mean span length {draws.mean():.3f} words"
    # Streams are independent of each other: different offsets, different draws.
    by_stream = draws.reshape(100, 1000)
    assert len({row.tobytes() for row in by_stream}) == 100


# SpanBERT's masking values (the released pretraining: 15 % of the tokens in spans of
# Geometric(0.2) words clipped to 1..10, each merged span 80/10/10 [MASK]/random/kept).
SPANBERT_MASKING = dict(mask_ratio=0.15, geometric_p=0.2, max_span_words=10)
SPANBERT_REPLACE_PROBS = (0.8, 0.1, 0.1)
# Mean of Geometric(0.2) clipped to 1..10 and renormalised; sd 2.554 words, so 100k draws
# have a standard error of 0.008 and the tolerance is 5 of them (p = 0.25 gives 3.403).
SPANBERT_MEAN_SPAN_WORDS = 3.797


def test_the_defaults_are_spanberts_in_the_masker_the_pretraining_options_and_the_cli(native):
    """Every other test passes the masking parameters explicitly, or compares two
    implementations that read the same default: a default geometric_p of 0.25 instead of
    0.2 passed them all. Here nothing is overridden."""
    masker = SpanMasker(mask_token_id=MASK, vocab_size=VOCAB_SIZE)
    for name, value in SPANBERT_MASKING.items():
        assert getattr(masker, name) == value, f"SpanMasker default {name}"
    assert masker.replace_probs == SPANBERT_REPLACE_PROBS, "SpanMasker default replace_probs"
    assert masker.max_span_len == SpanBertConfig().sbo_max_targets == 15

    options = {f.name: f.default for f in dataclasses.fields(PretrainOptions)}
    subparsers = argparse.ArgumentParser().add_subparsers()
    commands.add_training_commands(subparsers)
    pretrain = subparsers.choices["pretrain"]  # the CLI's own parser: nothing runs
    for name, value in SPANBERT_MASKING.items():
        assert options[name] == value, f"PretrainOptions default {name}"
        assert pretrain.get_default(name) == value, (
            f"spanbert-fast pretrain --{name.replace('_', '-')} default")

    # What the default masker draws: 100 streams x 1000 span lengths, no overrides.
    draws = native.sample_span_lengths(masker.seed, torch.arange(100) * 7919, 1000,
                                       masker._span_word_thresholds).numpy().ravel()
    assert span_length_probabilities() == span_length_probabilities(0.2, 10)
    assert abs(draws.mean() - SPANBERT_MEAN_SPAN_WORDS) < 0.04, (
        f"mean span length {draws.mean():.3f} words with the defaults, SpanBERT's is 3.797")
    assert draws.max() == SPANBERT_MASKING["max_span_words"]


# --------------------------------------------------------------------------- anchors


@pytest.mark.parametrize("implementation", ["native", "reference"])
def test_the_anchor_is_drawn_uniformly_over_the_maskable_positions(request, implementation):
    """2,000 rows ``[CLS] a b [SEP]``, one-word spans, budget ceil(0.15 * 2) = 1: each row
    masks exactly the word its one anchor lands on, so a and b are each masked
    Binomial(2000, 1/2) times, 1000 +- 22.4. An anchor draw that never reached the last
    maskable position was caught only 4.9 standard errors out by the per-row statistics
    (limit 4.0), and hung the ratio-1.0 test (its redraw loop waited for that position);
    here it gives 2000 vs 0."""
    rows = 2000
    input_ids = torch.tensor([[CLS, 10, 11, SEP]]).repeat(rows, 1)
    masker = make_masker(is_continuation=None, max_span_words=1)
    if implementation == "native":
        request.getfixturevalue("native")
        labels = masker(input_ids, offsets=list(range(rows))).labels.numpy()
    else:
        labels = run_reference(input_ids, None, masker, np.arange(rows))[1]
    masked = labels != IGNORE_INDEX
    assert (masked.sum(1) == 1).all(), "the budget is one token per row"
    assert not masked[:, [0, 3]].any(), "[CLS] and [SEP] are never masked"
    counts = masked[:, 1:3].sum(0)
    sd = math.sqrt(rows / 4)
    # 4 standard deviations (the suite's z limit); a seeded correct sampler sits well inside.
    assert np.all(np.abs(counts - rows / 2) < 4 * sd), (
        f"positions a, b masked {counts.tolist()} times in {rows} rows, expected "
        f"{rows // 2} +- {4 * sd:.0f} each")


# --------------------------------------------------------------------------- end to end


def test_replacement_is_80_10_10_per_merged_span(native):
    input_ids, attention_mask = make_batch(4096, 512, seed=30, min_length=256)
    out = make_masker()(input_ids, attention_mask)
    modes = check_masking(input_ids, attention_mask, out)["modes"]
    shares = np.bincount(modes, minlength=3) / len(modes)
    assert len(modes) > 40000
    assert np.all(np.abs(shares - [0.8, 0.1, 0.1]) < 0.01), (
        f"[MASK]/random/unchanged shares {shares.round(4)} over {len(modes)} merged spans")


@pytest.mark.parametrize("unigram", [False, True])
def test_random_tokens_follow_the_vocabulary_or_the_unigram_table(native, unigram):
    vocab_size = 64
    generator = torch.Generator().manual_seed(31)
    weights = torch.rand(vocab_size, generator=generator) if unigram else None
    masker = make_masker(vocab_size=vocab_size, is_continuation=None, unigram=weights,
                         replace_probs=(0.0, 1.0, 0.0), mask_ratio=0.3)
    ids = torch.randint(len(SPECIAL_IDS), vocab_size, (1000, 128), generator=generator)
    out = masker(ids)
    drawn = out.input_ids[out.labels != -100].numpy()
    probabilities = (np.full(vocab_size, 1 / vocab_size) if weights is None
                     else (weights / weights.sum()).numpy())
    p_value = goodness_of_fit(np.bincount(drawn, minlength=vocab_size), probabilities)
    assert len(drawn) > 30000 and p_value > P_VALUE_FLOOR, f"random tokens: p = {p_value:.2e}"


def test_native_op_agrees_with_the_numpy_reference(native):
    # Realistic rows: WordPiece continuations, [CLS]/[SEP] inside, right padding.
    batch, seq = 3000, 128
    input_ids, attention_mask = make_batch(batch, seq, seed=32, min_length=32)
    masker = make_masker()
    offsets = np.arange(batch)
    ours = check_masking(input_ids, attention_mask, masker(input_ids, attention_mask,
                                                           offsets=offsets.tolist()))
    reference_out = run_reference(input_ids, attention_mask, masker, offsets)
    theirs = check_masking(input_ids, attention_mask, reference_out)

    # Masked share: both exactly ceil(15 %) of each row's maskable tokens (checked above).
    assert np.array_equal(ours["masked_per_row"], theirs["masked_per_row"])
    # Merged spans: length distribution and mean.
    p_value = homogeneity(histogram(ours["lengths"], 16), histogram(theirs["lengths"], 16))
    assert p_value > P_VALUE_FLOOR, (
        f"merged span lengths differ from the reference: p = {p_value:.2e}")
    assert_means_agree(ours["lengths"], theirs["lengths"], "merged span length")
    assert_means_agree(ours["sbo_per_row"], theirs["sbo_per_row"], "SBO targets per row")
    p_value = homogeneity(np.bincount(ours["modes"], minlength=3),
                          np.bincount(theirs["modes"], minlength=3))
    assert p_value > P_VALUE_FLOOR, f"80/10/10 differs from the reference: p = {p_value:.2e}"
    # Where the masks fall. Masked tokens come in spans, so per-position counts are not
    # independent (a chi-square over position bins rejects even the reference against
    # itself); rows are: compare per-row statistics. (a) the mean relative position of a
    # row's masked tokens, (b) whether the row's first / last maskable token is masked (the
    # edges, where an off-by-one in the anchor or the word walks would show).
    lengths = attention_mask.sum(1).numpy()
    masked_ours = (masker(input_ids, attention_mask, offsets=offsets.tolist()).labels
                   != -100).numpy()
    masked_theirs = reference_out[1] != -100
    relative = np.arange(seq)[None, :] / lengths[:, None]
    maskable, _ = effective_word_starts(input_ids.numpy(), attention_mask.numpy(), SPECIAL_IDS)
    last = seq - 1 - np.argmax(maskable[:, ::-1], axis=1)  # each row's last maskable position
    rows = np.arange(batch)
    for name, statistic in (
            ("mean relative position of masked tokens",
             lambda m: (m * relative).sum(1) / np.maximum(m.sum(1), 1)),
            ("first maskable token masked", lambda m: m[:, 1].astype(np.float64)),
            ("last maskable token masked", lambda m: m[rows, last].astype(np.float64))):
        assert_means_agree(statistic(masked_ours), statistic(masked_theirs), name)


def test_whole_word_spans_agree_with_the_reference_when_every_token_is_a_word(native):
    # No continuations, no specials, long rows: the merged spans of both implementations.
    batch, seq = 1500, 256
    generator = torch.Generator().manual_seed(33)
    input_ids = torch.randint(len(SPECIAL_IDS), VOCAB_SIZE, (batch, seq), generator=generator)
    masker = make_masker(is_continuation=None, special_token_ids=(), mask_token_id=MASK)
    ours = check_masking(input_ids, None, masker(input_ids, offsets=list(range(batch))),
                         special_ids=(), is_continuation=None)
    reference_out = run_reference(input_ids, None, masker, np.arange(batch))
    theirs = check_masking(input_ids, None, reference_out, special_ids=(), is_continuation=None)
    p_value = homogeneity(histogram(ours["lengths"], 16), histogram(theirs["lengths"], 16))
    assert p_value > P_VALUE_FLOOR, f"merged span lengths: p = {p_value:.2e}"
    assert_means_agree(ours["lengths"], theirs["lengths"], "merged span length")
