"""The sampler's settings: the constants the native op shares, and the checks and integer
tables that turn :class:`~spanbert_fast.masking.SpanMasker`'s arguments into what the
compiled op and the NumPy reference read."""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

ACCEPTED_ID_DTYPES = (torch.int64, torch.int32)

# labels where a token is not masked (transformers' and torch's cross-entropy convention).
IGNORE_INDEX = -100
# Bits of the (vocab_size,) uint8 table the op reads (csrc/span_masking_core.h).
TOKEN_IS_CONTINUATION = 1
TOKEN_IS_SPECIAL = 2
# Probabilities reach the op as integers t / 2^32 compared with uint32 draws.
PROBABILITY_ONE = 1 << 32
# The op's threshold table holds max_span_words - 1 entries (core::kMaxSpanWords = 64).
MAX_SPAN_WORDS_LIMIT = 64
# The mask ratio as a fraction numerator / denominator: exact budgets in integers.
MASK_RATIO_MAX_DENOMINATOR = 10**6
INT64_RANGE = (-(1 << 63), (1 << 63) - 1)
# The native op's error for an id out of range (csrc/span_masking_cpu.cpp).


def span_length_probabilities(geometric_p: float = 0.2, max_span_words: int = 10) -> List[float]:
    """P(span length = k words) for k = 1..max_span_words: the geometric distribution
    ``p (1 - p)^(k - 1)`` clipped to ``1..max_span_words`` and renormalised (mean 3.8 words
    for p = 0.2 and 10 words)."""
    check_probability("geometric_p", geometric_p, allow_zero=False)
    check_int("max_span_words", max_span_words, 1, MAX_SPAN_WORDS_LIMIT)
    weights = [geometric_p * (1.0 - geometric_p) ** (k - 1) for k in range(1, max_span_words + 1)]
    total = math.fsum(weights)
    return [w / total for w in weights]


def integer_cdf(probabilities: Sequence[float]) -> List[int]:
    """round(2^32 x CDF), non-decreasing and ending at exactly 2^32."""
    total = math.fsum(probabilities)
    cdf, running, previous = [], 0.0, 0
    for p in probabilities:
        running += p
        value = min(PROBABILITY_ONE, max(previous, round(running / total * PROBABILITY_ONE)))
        cdf.append(value)
        previous = value
    cdf[-1] = PROBABILITY_ONE
    return cdf


def mask_ratio_fraction(mask_ratio: float) -> Fraction:
    return Fraction(mask_ratio).limit_denominator(MASK_RATIO_MAX_DENOMINATOR)


def masking_budget(maskable: int, ratio: Fraction) -> int:
    """ceil(ratio x maskable), exactly."""
    return -((-maskable * ratio.numerator) // ratio.denominator)


def check_int(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_probability(name: str, value: Any, allow_zero: bool = True) -> float:
    value = check_real(name, value)
    if not (0.0 <= value <= 1.0) or (not allow_zero and value == 0.0):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


def check_replace_probs(replace_probs: Any) -> Tuple[float, float, float]:
    if not isinstance(replace_probs, Sequence) or len(replace_probs) != 3:
        raise ValueError("replace_probs must be 3 probabilities (mask, random, keep), got "
                         f"{replace_probs!r}")
    probs = tuple(check_probability(f"replace_probs[{k}]", p) for k, p in enumerate(replace_probs))
    if abs(math.fsum(probs) - 1.0) > 1e-6:
        raise ValueError(f"replace_probs must sum to 1 (mask, random, keep), got {probs} "
                         f"(sum {math.fsum(probs)})")
    return probs


def as_vocab_table(name: str, value: Any, vocab_size: int, kind: str) -> torch.Tensor:
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


def unigram_integer_cdf(unigram: Any, vocab_size: int) -> torch.Tensor:
    weights = as_vocab_table("unigram", unigram, vocab_size, "weights").detach().cpu().double()
    if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()):
        raise ValueError("unigram must hold finite, non-negative weights")
    if float(weights.sum()) <= 0:
        raise ValueError("unigram must have a positive sum")
    return torch.tensor(integer_cdf(weights.tolist()), dtype=torch.int64)


def check_tensor(name: str, value: Any, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        kind = "a torch.Tensor or None" if optional else "a torch.Tensor"
        raise TypeError(f"{name} must be {kind}, got {type(value).__name__}")
