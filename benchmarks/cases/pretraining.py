"""One SpanBERT pretraining step: forward + backward of ``SpanBertForPreTraining``.

Synthetic batch: random ids, MLM labels on 15 % of the tokens, SBO targets from random
non-overlapping spans of 1..10 tokens (see :mod:`benchmarks.cases.inputs`). Dropout is off
in every variant so that the losses can be compared; the step ends with the gradients of
every parameter (``torch.autograd.grad``; no optimizer).

Variants: ``ours-triton`` (CUDA, once any Triton kernel is registered), ``ours-torch``,
and, on CUDA only (host synchronisations cost only where a device runs ahead of the host;
the CPU run lists them as skipped with that reason), issue 14's rows on the best backend:
``ours-packed`` (the packed layout of ``SpanMaskingCollator(packed=True)``: one host sync,
the batched value check), ``ours-packed-unchecked`` (the same with ``check_values=False``:
no host sync) and ``ours-cudagraphs`` (that step on static shapes under
``torch.compile(mode="reduce-overhead")``, i.e. CUDA graphs; the row's details say how
many graphs inductor refused to capture, ``cudagraph_skips``). Then the speed reference ``transformers-sdpa+torch-heads``: transformers' sdpa BERT with
the same encoder weights under SpanBERT's heads written in stock torch
(:class:`benchmarks.cases.peers.PlainPretrainingHeads`), which is also the parity oracle
(relative error of the loss).
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from spanbert_fast import SpanBertForPreTraining
from spanbert_fast.padding import unpad_lengths

from .. import formulas
from ..registry import Case, Instance, Shape, register_case
from .encoder import allow_recompiles, randomize_vectors
from .inputs import grad_of, mlm_labels, padding_mask, row_lengths, sbo_targets, token_ids
from .peers import PlainPretrainingHeads, load_weights, transformers_bert

__all__ = ["PRETRAINING_CASE"]

PEER = "transformers-sdpa+torch-heads"
# Issue 14's rows (CUDA only): packed inputs with and without the value check, CUDA graphs.
PACKED_VARIANTS = ("ours-packed", "ours-packed-unchecked", "ours-cudagraphs")
CPU_SKIP = ("CUDA only: host synchronisations and launch overhead cost only where a device "
            "runs ahead of the host (the CPU run would time the same work as ours-torch)")


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
    if ctx.on_cuda:
        for name in PACKED_VARIANTS:
            model = SpanBertForPreTraining(cfg, backend="auto")
            model.load_state_dict(ours.state_dict())
            model.check_values = name == "ours-packed"
            models[name] = model
    else:
        skipped.update({name: CPU_SKIP for name in PACKED_VARIANTS})
    encoder = transformers_bert(cfg, "sdpa")
    load_weights(encoder, ours.bert)
    heads = PlainPretrainingHeads(ours)
    for model in (*models.values(), encoder, heads):
        model.to(device=ctx.device, dtype=ctx.dtype).train()
    calls = {}
    for name, model in models.items():
        params = [p for p in model.parameters() if p.requires_grad]
        if name == "ours-cudagraphs":
            allow_recompiles()
            calls[name] = _cudagraph_step(torch.compile(model, mode="reduce-overhead",
                                                        fullgraph=True), params)
        elif name in PACKED_VARIANTS:
            calls[name] = _packed_step(model, params, "packed")
        else:
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


def _packed_step(model, params, key):
    def step(inp):
        loss = model(**inp[key]).loss
        grad_of(loss, params)
        return [loss.detach().float()]
    return step


def _cudagraph_step(compiled, params):
    def step(inp):
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the last outputs are free
        loss = compiled(**inp["static"]).loss
        grad_of(loss, params)
        return [loss.detach().float().clone()]  # the graph's output buffer is reused
    return step


def _packed_inputs(inp: Dict[str, Any], lengths: List[int], seq: int,
                   targets: int, masked: int) -> Dict[str, Any]:
    """The packed layout of one padded input, as SpanMaskingCollator(packed=True) gives it
    (built here outside the timed call), and its static version: MLM positions and SBO
    targets padded with fillers to the instance's largest counts, so every input of a row
    has one shape."""
    device = inp["ids"].device
    unpadded = unpad_lengths(lengths, seq, device=device)
    positions = (inp["labels"].reshape(-1) != -100).nonzero().squeeze(1)
    packed = {"input_ids": inp["ids"], "attention_mask": inp["mask"], "labels": inp["labels"],
              "sbo_targets": inp["sbo_targets"], "unpadded": unpadded,
              "mlm_positions": positions}
    slots = len(lengths) * seq
    filler = inp["sbo_targets"].new_zeros((targets - inp["sbo_targets"].shape[0], 5))
    filler[:, 4] = -100
    static = dict(packed, sbo_targets=torch.cat([inp["sbo_targets"], filler]),
                  mlm_positions=torch.cat([positions, positions.new_full(
                      (masked - positions.shape[0],), slots)]))
    return {"packed": packed, "static": static}


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
    details = {"model": ctx.settings.model, "masked": masked, "sbo_targets": targets}
    if ctx.on_cuda:
        most_masked = max(int((i["labels"] != -100).sum()) for i in inputs)
        most_targets = max(int(i["sbo_targets"].shape[0]) for i in inputs)
        for inp in inputs:
            inp.update(_packed_inputs(inp, lengths, shape.seq, most_targets, most_masked))
        from torch._dynamo.utils import counters
        skips = counters["inductor"]["cudagraph_skips"]
        state["calls"]["ours-cudagraphs"](inputs[0])  # compile + capture, outside timing
        details["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
    return Instance(
        inputs=inputs, variants=dict(state["calls"]), speed_reference=PEER, oracle=PEER,
        oracle_name=PEER, tokens=sum(lengths), bound="compute",
        flops=formulas.pretraining_step_flops(
            lengths, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers,
            cfg.vocab_size, masked, targets, cfg.sbo_position_embedding_size),
        skipped=dict(state["skipped"]), details=details)


PRETRAINING_CASE = register_case(Case(
    name="pretraining", group="pretraining", modes=("fwd+bwd",), shapes=_shapes,
    build_state=_build_state, build_instance=_build_instance,
    description="SpanBertForPreTraining forward + backward (MLM + SBO) vs transformers' sdpa "
                "encoder under stock-torch heads"))
