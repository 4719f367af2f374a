"""One SpanBERT pretraining step: forward + backward of ``SpanBertForPreTraining``.

Synthetic batch: random ids, MLM labels on 15 % of the tokens, SBO targets from random
non-overlapping spans of 1..10 tokens (see :mod:`benchmarks.cases.inputs`). Dropout is off
in every variant so that the losses can be compared; the step ends with the gradients of
every parameter (``torch.autograd.grad``; no optimizer).

Variants: ``ours-triton`` (CUDA, once any Triton kernel is registered), ``ours-torch``,
and the speed reference ``transformers-sdpa+torch-heads``: transformers' sdpa BERT with
the same encoder weights under SpanBERT's heads written in stock torch
(:class:`benchmarks.cases.peers.PlainPretrainingHeads`), which is also the parity oracle
(relative error of the loss).
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from spanbert_fast import SpanBertForPreTraining

from .. import formulas
from ..registry import Case, Instance, Shape, register_case
from .encoder import randomize_vectors
from .inputs import grad_of, mlm_labels, padding_mask, row_lengths, sbo_targets, token_ids
from .peers import PlainPretrainingHeads, load_weights, transformers_bert

__all__ = ["PRETRAINING_CASE"]

PEER = "transformers-sdpa+torch-heads"


def _build_state(ctx) -> Dict[str, Any]:
    cfg = ctx.config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    gen = ctx.generator("pretraining", "weights")
    ours = SpanBertForPreTraining(cfg, backend="torch")
    randomize_vectors(ours, gen)
    models: Dict[str, torch.nn.Module] = {}
    skipped: Dict[str, str] = {}
    if ctx.triton_ops:
        fused = SpanBertForPreTraining(cfg, backend="auto")
        fused.load_state_dict(ours.state_dict())
        models["ours-triton"] = fused
    else:
        skipped["ours-triton"] = (ctx.triton_reason("attention") if not ctx.on_cuda else
                                  "no Triton kernel is registered yet")
    models["ours-torch"] = ours
    encoder = transformers_bert(cfg, "sdpa")
    load_weights(encoder, ours.bert)
    heads = PlainPretrainingHeads(ours)
    for model in (*models.values(), encoder, heads):
        model.to(device=ctx.device, dtype=ctx.dtype).train()
    calls = {}
    for name, model in models.items():
        params = [p for p in model.parameters() if p.requires_grad]
        calls[name] = _ours_step(model, params)
    peer_params = [p for m in (encoder, heads) for p in m.parameters() if p.requires_grad]
    calls[PEER] = _peer_step(encoder, heads, peer_params)
    return {"calls": calls, "skipped": skipped, "config": cfg}


def _ours_step(model, params):
    def step(inp):
        loss = model(inp["ids"], inp["mask"], labels=inp["labels"],
                     sbo_targets=inp["sbo_targets"]).loss
        grad_of(loss, params)
        return [loss.detach().float()]
    return step


def _peer_step(encoder, heads, params):
    def step(inp):
        hidden = encoder(input_ids=inp["ids"], attention_mask=inp["mask"]).last_hidden_state
        loss = heads(hidden, encoder.embeddings.word_embeddings.weight, inp["labels"],
                     inp["sbo_targets"])
        grad_of(loss, params)
        return [loss.detach().float()]
    return step


def _shapes(ctx) -> List[Shape]:
    # SpanBERT pretrains on full-length blocks, so only full batches.
    s = ctx.settings
    return [Shape(batch, seq) for seq in s.seqs for batch in s.batches]


def _build_instance(state, shape: Shape, mode: str, ctx) -> Instance:
    cfg, device = state["config"], ctx.device
    gen = ctx.generator("pretraining", shape.label)
    lengths = row_lengths(shape, gen)
    mask = padding_mask(lengths, shape.seq, device)
    inputs = []
    for _ in range(ctx.inputs_per_row):
        inputs.append({
            "ids": token_ids(shape.batch, shape.seq, cfg.vocab_size, gen, device, lengths),
            "mask": mask,
            "labels": mlm_labels(lengths, shape.seq, cfg.vocab_size, gen, device),
            "sbo_targets": sbo_targets(lengths, cfg.vocab_size, cfg.sbo_max_targets, gen, device),
        })
    first = inputs[0]
    masked = int((first["labels"] != -100).sum())
    targets = int(first["sbo_targets"].shape[0])
    return Instance(
        inputs=inputs, variants=dict(state["calls"]), speed_reference=PEER, oracle=PEER,
        oracle_name=PEER, tokens=sum(lengths), bound="compute",
        flops=formulas.pretraining_step_flops(
            lengths, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
            cfg.vocab_size, masked, targets, cfg.sbo_position_embedding_size),
        skipped=dict(state["skipped"]),
        details={"model": ctx.settings.model, "masked": masked, "sbo_targets": targets})


PRETRAINING_CASE = register_case(Case(
    name="pretraining", group="pretraining", modes=("fwd+bwd",), shapes=_shapes,
    build_state=_build_state, build_instance=_build_instance,
    description="SpanBertForPreTraining forward + backward (MLM + SBO) vs transformers' sdpa "
                "encoder under stock-torch heads"))
