"""Random inputs shared by the cases: padded lengths, token ids, MLM labels, SBO targets.

Everything is drawn on the CPU from a seeded generator and then moved, so a CPU run and a
GPU run of the same settings see the same numbers. Values are random (never zeros or ones)
so that a variant that skips work cannot look right.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ..registry import Shape

__all__ = [
    "MASK_FRACTION",
    "row_lengths",
    "padding_mask",
    "token_ids",
    "randn",
    "mlm_labels",
    "sbo_targets",
    "grad_of",
    "relative_error",
]

# BERT/SpanBERT mask 15 % of the tokens; the MLM and SBO heads run on that many rows.
MASK_FRACTION = 0.15


def row_lengths(shape: Shape, gen: torch.Generator) -> List[int]:
    """Real length of each row: ``seq`` for a full batch, else uniform in [seq/8, seq]."""
    if not shape.padded:
        return [shape.seq] * shape.batch
    low = max(1, shape.seq // 8)
    return torch.randint(low, shape.seq + 1, (shape.batch,), generator=gen).tolist()


def padding_mask(lengths: List[int], seq: int, device: torch.device) -> torch.Tensor:
    """(batch, seq) int64 attention mask, 1 on the first ``length`` columns of each row."""
    positions = torch.arange(seq).unsqueeze(0)
    return (positions < torch.tensor(lengths).unsqueeze(1)).to(torch.long).to(device)


def token_ids(batch: int, seq: int, vocab: int, gen: torch.Generator,
              device: torch.device, lengths: Optional[List[int]] = None,
              pad_token_id: int = 0) -> torch.Tensor:
    """(batch, seq) int64 ids in [1, vocab); padding columns hold ``pad_token_id``."""
    ids = torch.randint(1, vocab, (batch, seq), generator=gen)
    if lengths is not None:
        ids = ids.masked_fill(torch.arange(seq).unsqueeze(0) >= torch.tensor(lengths).unsqueeze(1),
                              pad_token_id)
    return ids.to(device)


def randn(shape, gen: torch.Generator, device: torch.device, dtype: torch.dtype,
          scale: float = 1.0, shift: float = 0.0, requires_grad: bool = False) -> torch.Tensor:
    t = (torch.randn(shape, generator=gen) * scale + shift).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def mlm_labels(lengths: List[int], seq: int, vocab: int, gen: torch.Generator,
               device: torch.device) -> torch.Tensor:
    """(batch, seq) int64: a random label on ~15 % of each row's real positions (at least
    one), -100 elsewhere."""
    labels = torch.full((len(lengths), seq), -100, dtype=torch.long)
    for row, length in enumerate(lengths):
        count = max(1, round(MASK_FRACTION * length))
        positions = torch.randperm(length, generator=gen)[:count]
        labels[row, positions] = torch.randint(0, vocab, (count,), generator=gen)
    return labels.to(device)


def sbo_targets(lengths: List[int], vocab: int, max_targets: int, gen: torch.Generator,
                device: torch.device) -> torch.Tensor:
    """(N, 5) int64 rows ``(row, left, right, rel_pos, label)`` as the span sampler emits
    them: per row, non-overlapping spans of 1..10 tokens whose boundaries lie inside the
    row, until ~15 % of its tokens are covered; one target per span token, ``rel_pos`` <
    ``max_targets``."""
    rows = []
    for row, length in enumerate(lengths):
        if length < 3:
            continue  # no span has both boundaries inside a row this short
        budget = max(1, round(MASK_FRACTION * length))
        taken = torch.zeros(length, dtype=torch.bool)
        covered, attempts = 0, 0
        while covered < budget and attempts < 50:
            attempts += 1
            span = int(torch.randint(1, 11, (1,), generator=gen))
            span = min(span, length - 2, budget - covered, max_targets)
            start = int(torch.randint(1, length - span, (1,), generator=gen))
            end = start + span - 1  # inclusive; boundaries start-1 >= 0 and end+1 < length
            if bool(taken[start - 1:end + 2].any()):
                continue
            taken[start:end + 1] = True
            for offset in range(span):
                rows.append((row, start - 1, end + 1, offset,
                             int(torch.randint(0, vocab, (1,), generator=gen))))
            covered += span
    if not rows:
        return torch.zeros(0, 5, dtype=torch.long, device=device)
    return torch.tensor(rows, dtype=torch.long).to(device)


def grad_of(output: torch.Tensor, wrt: List[torch.Tensor],
            grad_output: Optional[torch.Tensor] = None) -> List[torch.Tensor]:
    """Gradients of ``output`` (seeded with ``grad_output``) with respect to ``wrt``,
    without accumulating into ``.grad`` (zeros where an input is unused)."""
    grads = torch.autograd.grad(output, wrt, grad_output, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for g, w in zip(grads, wrt)]


def relative_error(got: List[torch.Tensor], want: List[torch.Tensor]) -> Tuple[float, bool]:
    """Worst relative error of ``got`` against ``want`` (pairs of tensors), in fp64.

    Per pair: ``max |got - want| / max(max |want|, floor)`` where ``floor`` is 1e-3 of the
    largest ``max |want|`` over all pairs. The floor keeps a gradient that is zero in exact
    arithmetic from dividing rounding noise by rounding noise (the key projection's bias
    gets none: softmax ignores a per-row constant). One tensor: plain max relative error.
    Returns (error, finite); ``finite`` is False when either side holds NaN/inf.
    """
    if len(got) != len(want):
        raise ValueError(f"parity: {len(got)} tensors against {len(want)}")
    pairs = []
    for a, b in zip(got, want):
        if tuple(a.shape) != tuple(b.shape):
            raise ValueError(f"parity: shape {tuple(a.shape)} against {tuple(b.shape)}")
        a = a.detach().to(torch.float64)
        b = b.detach().to(torch.float64)
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            return float("nan"), False
        if a.numel():
            pairs.append((float((a - b).abs().max()), float(b.abs().max())))
    if not pairs:
        return 0.0, True
    floor = 1e-3 * max(scale for _, scale in pairs)
    worst = 0.0
    for diff, scale in pairs:
        denominator = max(scale, floor)
        worst = max(worst, diff / denominator if denominator > 0 else diff)
    return worst, True
