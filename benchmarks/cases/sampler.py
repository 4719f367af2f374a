"""The span-masking sampler: :class:`spanbert_fast.masking.SpanMasker` (the compiled op,
on the run's device) against its NumPy reference ``reference_span_masking``.

Rows appear when :mod:`spanbert_fast.masking` provides ``SpanMasker`` (else the case is
listed as skipped, with why). Synthetic batches: random ids with [CLS] first and [SEP]
last in each row, padded rows (lengths uniform in [seq/8, seq]), ~1.3 pieces per word.
The speed reference is the NumPy reference (one Python loop per sequence). The sampler is
random and the two backends draw differently (same distribution, not the same numbers), so
there is no per-element parity here: its statistics are tested in ``tests/``. When the
compiled extension is missing, ``SpanMasker`` itself falls back to the NumPy reference;
the row's shape details say which ran (``sampler_backend``).
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch

from ..registry import Case, Instance, Shape, register_case
from .inputs import padding_mask, row_lengths, token_ids

__all__ = ["SAMPLER_CASE"]


def _masking_module():
    try:
        from spanbert_fast import masking
    except Exception:  # noqa: BLE001 - a broken extension must not stop the suite
        return None
    return masking


def _available(ctx) -> Optional[str]:
    masking = _masking_module()
    if masking is None:
        return "spanbert_fast.masking cannot be imported yet"
    if not hasattr(masking, "SpanMasker"):
        return "spanbert_fast.masking has no SpanMasker yet (the sampler is a later issue)"
    return None


# bert-base-cased ids of [PAD], [CLS], [SEP], [MASK] (valid in every preset's vocabulary).
_PAD, _CLS, _SEP, _MASK = 0, 101, 102, 103
_SPECIAL = (_PAD, _CLS, _SEP, _MASK)


def _shapes(ctx) -> List[Shape]:
    s = ctx.settings
    return [Shape(batch, seq, True) for seq in s.seqs for batch in s.batches]


def _sampler_backend(masking) -> str:
    loader = getattr(masking, "load_extension", None)
    try:
        return "extension" if loader is not None and loader() is not None else "numpy fallback"
    except Exception:  # noqa: BLE001
        return "numpy fallback"


def _build_instance(state, shape: Shape, mode: str, ctx) -> Instance:
    masking = _masking_module()
    cfg, device = ctx.config, ctx.device
    gen = ctx.generator("sampler", shape.label)
    lengths = row_lengths(shape, gen)
    mask = padding_mask(lengths, shape.seq, device)
    inputs = []
    for _ in range(ctx.inputs_per_row):
        ids = token_ids(shape.batch, shape.seq, cfg.vocab_size, gen, torch.device("cpu"),
                        lengths, _PAD)
        ids = ids.masked_fill(ids == _MASK, _MASK + 1)  # no [MASK] in the input
        ids[:, 0] = _CLS
        ids[torch.arange(shape.batch), torch.tensor(lengths) - 1] = _SEP
        # ~1.3 pieces a word, as WordPiece gives on English text.
        word_start = torch.rand(shape.batch, shape.seq, generator=gen) < 0.77
        inputs.append({"ids": ids.to(device), "mask": mask, "word_start": word_start.to(device),
                       "numpy": (ids.numpy(), mask.cpu().numpy(), word_start.numpy())})
    masker = masking.SpanMasker(mask_token_id=_MASK, vocab_size=cfg.vocab_size,
                                special_token_ids=_SPECIAL, max_span_len=cfg.sbo_max_targets,
                                seed=ctx.settings.seed).to(device)

    def ours(inp: Any):
        return masker(inp["ids"], inp["mask"], word_starts=inp["word_start"]).input_ids

    variants = {"ours": ours}
    skipped = {}
    reference = getattr(masking, "reference_span_masking", None)
    if reference is not None:
        def numpy_reference(inp: Any):
            ids, attention, starts = inp["numpy"]
            return reference(ids, attention, mask_token_id=_MASK, vocab_size=cfg.vocab_size,
                             word_starts=starts, special_token_ids=_SPECIAL,
                             max_span_len=cfg.sbo_max_targets, seed=ctx.settings.seed)[0]
        variants["numpy-reference"] = numpy_reference
        speed_reference = "numpy-reference"
    else:
        skipped["numpy-reference"] = "spanbert_fast.masking has no reference_span_masking"
        speed_reference = "ours"
    return Instance(inputs=inputs, variants=variants, speed_reference=speed_reference,
                    oracle=None, oracle_name="none (random; statistics are tested in tests/)",
                    tokens=sum(lengths), bound="memory", skipped=skipped,
                    details={"sampler_backend": _sampler_backend(masking)})


SAMPLER_CASE = register_case(Case(
    name="span_masking", group="sampler", modes=("fwd",), shapes=_shapes,
    build_instance=_build_instance, available=_available,
    description="the span-masking sampler (compiled op) vs its NumPy reference"))
