"""The encoder: ``SpanBertModel`` against ``transformers.BertModel`` with the same weights.

Variants: ``ours-triton`` (CUDA, once any Triton kernel is registered: backend "auto"
runs each op's kernel where one exists), ``ours-torch``, ``transformers-eager``,
``transformers-sdpa`` (the speed reference) and, on CUDA, ``transformers-compile``
(``torch.compile`` of the sdpa model). Parity oracle: ``transformers-eager``, over real
positions (ours returns zeros at padding, transformers does not), and in fwd+bwd mode over
every parameter's gradient too.

Shapes: a latency point (batch 1 at the shortest sequence), then every (batch, seq) of the
run, full and padded. The weights are transformers' initialisation with the 1-D
parameters (biases, LayerNorm) re-drawn at random, so a dropped bias cannot look right.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from .. import formulas
from ..registry import Case, Instance, Shape, register_case
from .inputs import grad_of, padding_mask, randn, row_lengths, token_ids
from .peers import (load_weights, ours_from_transformers, shared_parameter_names,
                    transformers_bert)

__all__ = ["ENCODER_CASE", "randomize_vectors", "allow_recompiles", "build_encoder_state",
           "encoder_instance"]


def randomize_vectors(model: torch.nn.Module, gen: torch.Generator) -> None:
    """Re-draw every 1-D parameter: LayerNorm weights around 1, everything else around 0."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                is_norm = "LayerNorm" in name or "layer_norm" in name
                shift = 1.0 if is_norm and name.endswith(".weight") else 0.0
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + shift)


def allow_recompiles(limit: int = 64) -> None:
    """Every (batch, seq, grad mode) is a new graph for torch.compile; dynamo's default of
    8 cached graphs would silently fall back to eager half-way through a run."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(limit, getattr(torch._dynamo.config, name)))


def build_encoder_state(ctx, key: str, torch_layouts: Dict[str, str]) -> Dict[str, Any]:
    """The models every encoder case times, with one set of weights: ``ours-triton``
    (when its kernels run here), one torch-backend model per ``torch_layouts`` entry
    (variant name -> layout), transformers eager and sdpa, and on CUDA
    ``transformers-compile``. ``key`` salts the weights' generator."""
    cfg = ctx.config
    gen = ctx.generator(key, "weights")
    eager = transformers_bert(cfg, "eager")
    randomize_vectors(eager, gen)
    sdpa = transformers_bert(cfg, "sdpa")
    load_weights(sdpa, eager)
    models: Dict[str, torch.nn.Module] = {}
    skipped: Dict[str, str] = {}
    if ctx.triton_ops:
        models["ours-triton"] = ours_from_transformers(eager, cfg, "auto")
    else:
        skipped["ours-triton"] = (ctx.triton_reason("attention") if not ctx.on_cuda else
                                  "no Triton kernel is registered yet (backend 'auto' would "
                                  "equal ours-torch)")
    for name, layout in torch_layouts.items():
        model = ours_from_transformers(eager, cfg, "torch")
        model.layout = layout
        models[name] = model
    models["transformers-eager"] = eager
    models["transformers-sdpa"] = sdpa
    for model in models.values():
        model.to(device=ctx.device, dtype=ctx.dtype).eval()
    owners = dict(models)  # whose parameters a variant's gradients are taken of
    if ctx.on_cuda:
        allow_recompiles()
        models["transformers-compile"] = torch.compile(sdpa)
        owners["transformers-compile"] = sdpa
    else:
        skipped["transformers-compile"] = "CPU run: torch.compile rows are measured on CUDA only"
    names = shared_parameter_names(*owners.values())
    params = {variant: [dict(owner.named_parameters())[n] for n in names]
              for variant, owner in owners.items()}
    return {"models": models, "params": params, "skipped": skipped}


def encoder_instance(state, inputs: List[Dict[str, Any]], lengths: List[int], grad: bool,
                     ctx, details: Dict[str, Any]) -> Instance:
    """An :class:`Instance` timing every model of ``state`` on ``inputs`` (dicts of
    ``ids``, ``mask``, optional ``types``, and ``grad_out`` when ``grad``); parity over
    real positions against transformers eager, every parameter gradient in fwd+bwd."""
    cfg = ctx.config

    def variant(name: str):
        model, params = state["models"][name], state["params"][name]

        def forward(inp):
            return model(input_ids=inp["ids"], attention_mask=inp["mask"],
                         token_type_ids=inp.get("types")).last_hidden_state

        if not grad:
            return forward

        def forward_backward(inp):
            out = forward(inp)
            return [out, *grad_of(out, params, inp["grad_out"])]

        return forward_backward

    def real_positions(out, inp):
        tensors = out if isinstance(out, list) else [out]
        return [tensors[0][inp["mask"].bool()], *tensors[1:]]

    return Instance(
        inputs=inputs, variants={name: variant(name) for name in state["models"]},
        speed_reference="transformers-sdpa", oracle="transformers-eager",
        oracle_name="transformers-eager", tokens=sum(lengths), bound="compute",
        flops=formulas.encoder_flops(lengths, cfg.hidden_size, cfg.intermediate_size,
                                     cfg.num_hidden_layers, backward=grad),
        parity_view=real_positions, skipped=dict(state["skipped"]),
        details={"model": ctx.settings.model, "layers": cfg.num_hidden_layers,
                 "hidden": cfg.hidden_size, **details})


def _build_state(ctx) -> Dict[str, Any]:
    # ours-torch: the torch backend as a user gets it (layout "auto" packs padded shapes).
    return build_encoder_state(ctx, "encoder", {"ours-torch": "auto"})


def _shapes(ctx) -> List[Shape]:
    s = ctx.settings
    shapes = [Shape(1, min(s.seqs))]
    for seq in s.seqs:
        for batch in s.batches:
            for padded in (False, True):
                shape = Shape(batch, seq, padded)
                if shape not in shapes:
                    shapes.append(shape)
    return shapes


def _build_instance(state, shape: Shape, mode: str, ctx) -> Instance:
    cfg, device, dtype = ctx.config, ctx.device, ctx.dtype
    grad = mode != "fwd"
    gen = ctx.generator("encoder", shape.label)
    lengths = row_lengths(shape, gen)
    mask = padding_mask(lengths, shape.seq, device)
    inputs = []
    for _ in range(ctx.inputs_per_row):
        inp = {"ids": token_ids(shape.batch, shape.seq, cfg.vocab_size, gen, device, lengths,
                                cfg.pad_token_id),
               "mask": mask}
        if grad:
            keep = mask.unsqueeze(-1).to(dtype)
            inp["grad_out"] = randn((shape.batch, shape.seq, cfg.hidden_size), gen, device,
                                    dtype) * keep
        inputs.append(inp)
    return encoder_instance(state, inputs, lengths, grad, ctx, {})


ENCODER_CASE = register_case(Case(
    name="encoder", group="encoder", modes=("fwd", "fwd+bwd"), shapes=_shapes,
    build_state=_build_state, build_instance=_build_instance,
    description="SpanBertModel vs transformers.BertModel (eager, sdpa, compile) with the same "
                "weights"))
