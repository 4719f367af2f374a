"""The encoder on batches with a real length distribution: real English sentences, and
SQuAD-style question + context windows, tokenized with WordPiece (see :mod:`.real_text`).

Variants: ``ours-packed`` and ``ours-padded`` (the torch backend forced to each layout:
what ``layout="auto"`` chooses between), ``ours-triton`` (CUDA), ``transformers-eager``
(the parity oracle), ``transformers-sdpa`` (the speed reference) and, on CUDA,
``transformers-compile``. Parity is taken over real positions, and in fwd+bwd mode over
every parameter's gradient too.

Shapes: ``encoder-sentences`` draws 16 sentences (64 too in a full run; ``--batch`` sets
other counts) and pads them to the longest, as a tokenizer's ``padding=True`` does; ``encoder-qa-windows`` builds 4
windows (8 in a full run) padded to 384 tokens (or the model's max_position_embeddings
if fewer), as run_squad pads every window. A
shape's ``seq`` is the padded width; the real-token share is in the row's details.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from ..registry import Case, Instance, Shape, register_case
from . import real_text
from .encoder import build_encoder_state, encoder_instance
from .inputs import randn

__all__ = ["SENTENCES_CASE", "QA_WINDOWS_CASE"]

QA_WINDOW = 384  # run_squad's max_seq_length in the SpanBERT README's SQuAD commands


def _build_state(ctx) -> Dict[str, Any]:
    return build_encoder_state(ctx, "encoder-real", {"ours-packed": "packed",
                                                     "ours-padded": "padded"})


def _draw(kind: str, batch: int, ctx):
    """The batch of ``kind`` ("sentences" or "qa") for this run's seed, on the CPU:
    ``(input_ids, attention_mask, token_type_ids or None)``."""
    gen = ctx.generator("encoder-real", kind, batch)
    if kind == "sentences":
        ids, mask = real_text.sentence_batch(batch, gen,
                                             max_len=ctx.config.max_position_embeddings)
        return ids, mask, None
    # A model with fewer positions (the tiny test model) gets windows of its length.
    return real_text.qa_windows(batch, gen, min(QA_WINDOW, ctx.config.max_position_embeddings))


def _shapes_for(kind: str, quick_batches, full_batches):
    def shapes(ctx) -> List[Shape]:
        batches = quick_batches if ctx.settings.quick else full_batches
        if any(arg == "--batch" or arg.startswith("--batch=") for arg in ctx.settings.argv):
            batches = ctx.settings.batches  # an explicit --batch picks the rows' sizes too
        out = []
        for batch in batches:
            ids, _, _ = _draw(kind, batch, ctx)
            out.append(Shape(batch, ids.shape[1], padded=True))
        return out
    return shapes


def _instance_for(kind: str):
    def build(state, shape: Shape, mode: str, ctx) -> Instance:
        cfg, device, dtype = ctx.config, ctx.device, ctx.dtype
        grad = mode != "fwd"
        ids, mask, types = _draw(kind, shape.batch, ctx)
        ids = ids.clamp_max(cfg.vocab_size - 1)  # the 3,270-piece vocabulary fits any model
        lengths = mask.sum(1).tolist()
        gen = ctx.generator("encoder-real", kind, shape.label, mode)
        inp = {"ids": ids.to(device), "mask": mask.to(device),
               "types": types.to(device) if types is not None else None}
        if grad:
            keep = inp["mask"].unsqueeze(-1).to(dtype)
            inp["grad_out"] = randn((shape.batch, shape.seq, cfg.hidden_size), gen, device,
                                    dtype) * keep
        # One batch, rotated as copies: the layout decision depends on the lengths, so
        # every timed call sees the same composition (these calls are compute bound).
        inputs = [dict(inp) for _ in range(ctx.inputs_per_row)]
        return encoder_instance(state, inputs, lengths, grad, ctx, {
            "text": kind, "real_tokens_pct": round(100 * sum(lengths) / mask.numel()),
            "real_tokens": sum(lengths), "longest": max(lengths)})
    return build


def _available(ctx):
    return real_text.unavailable_reason()


SENTENCES_CASE = register_case(Case(
    name="encoder-sentences", group="encoder", modes=("fwd", "fwd+bwd"),
    shapes=_shapes_for("sentences", (16,), (16, 64)),
    build_state=_build_state, build_instance=_instance_for("sentences"),
    available=_available,
    description="SpanBertModel (packed / padded layout) vs transformers on batches of real "
                "English sentences padded to their longest"))

QA_WINDOWS_CASE = register_case(Case(
    name="encoder-qa-windows", group="encoder", modes=("fwd", "fwd+bwd"),
    shapes=_shapes_for("qa", (4,), (8,)),
    build_state=_build_state, build_instance=_instance_for("qa"),
    available=_available,
    description="SpanBertModel (packed / padded layout) vs transformers on SQuAD-style "
                f"question + real-paragraph windows padded to {QA_WINDOW}"))
