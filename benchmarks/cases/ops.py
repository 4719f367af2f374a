"""One case per fused op of :mod:`spanbert_fast.ops`, each against its reference and a peer.

Variants of every op case:

``ours-triton``  ``spanbert_fast.ops.<op>(..., backend="triton")``; present only on CUDA
                 once the op's kernel is registered (else listed as skipped, with why)
``ours-torch``   ``spanbert_fast.ops.<op>(..., backend="torch")`` (validation included)
``reference``    ``spanbert_fast.ops.reference.<op>`` called directly
peers            the stock-torch way to compute the same thing (the speed reference),
                 and for attention also transformers' eager BERT attention

Parity oracle: the reference run in fp32 on fp32 copies of the inputs (so a bf16 row shows
its dtype's error). In fwd+bwd mode the gradients of every input are compared too.
Shapes come from the model config (``--model``): attention on (batch, heads, seq, 64);
LayerNorm on (batch*seq, hidden); bias-GELU on (batch*seq, intermediate); the linear
cross-entropy and the span-boundary head on 15 % of batch*seq rows (the masked tokens)
against the vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from spanbert_fast import ops
from spanbert_fast.ops import reference

from .. import formulas
from ..registry import Case, Instance, Shape, register_case
from .inputs import MASK_FRACTION, grad_of, padding_mask, randn, row_lengths
from .peers import PlainSpanBoundaryHead

__all__ = ["OP_CASES"]

Call = Callable[[Dict[str, Any]], torch.Tensor]


def _as_variant(call: Call, mode: str, wrt: List[str]) -> Callable[[Dict[str, Any]], Any]:
    """``call`` as a variant: its output, or (fwd+bwd) its output and the gradients of the
    inputs named in ``wrt`` (seeded with the input's ``grad_out`` for non-scalar outputs)."""
    if mode == "fwd":
        return call

    def forward_backward(inp: Dict[str, Any]) -> List[torch.Tensor]:
        out = call(inp)
        seed = inp.get("grad_out") if out.dim() else None
        return [out, *grad_of(out, [inp[k] for k in wrt], seed)]

    return forward_backward


def _fp32_oracle(call: Call, mode: str, wrt: List[str]) -> Callable[[Dict[str, Any]], Any]:
    """The reference ``call`` on fp32 copies of the float inputs (gradients too)."""

    def oracle(inp: Dict[str, Any]) -> Any:
        up = {}
        for key, value in inp.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                value = value.detach().float().requires_grad_(mode != "fwd" and key in wrt)
            up[key] = value
        return _as_variant(call, mode, wrt)(up)

    return oracle


def _op_variants(op: str, ours: Callable[[Dict[str, Any], str], torch.Tensor], ref: Call,
                 peers: Dict[str, Call], mode: str, wrt: List[str], ctx) -> tuple:
    variants: Dict[str, Callable] = {}
    skipped: Dict[str, str] = {}
    reason = ctx.triton_reason(op)
    if reason is None:
        variants["ours-triton"] = _as_variant(lambda inp: ours(inp, "triton"), mode, wrt)
    else:
        skipped["ours-triton"] = reason
    variants["ours-torch"] = _as_variant(lambda inp: ours(inp, "torch"), mode, wrt)
    variants["reference"] = _as_variant(ref, mode, wrt)
    for name, call in peers.items():
        variants[name] = _as_variant(call, mode, wrt)
    return variants, skipped


def _token_shapes(ctx) -> List[Shape]:
    s = ctx.settings
    return [Shape(b, seq) for seq in s.seqs for b in s.batches]


def _attention_shapes(ctx) -> List[Shape]:
    s = ctx.settings
    return [Shape(b, seq, padded) for seq in s.seqs for b in s.batches for padded in (False, True)]


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty(0, dtype=dtype).element_size()


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------
def _transformers_eager_attention() -> Optional[Callable]:
    try:
        from transformers.models.bert.modeling_bert import eager_attention_forward
    except ImportError:
        return None
    return eager_attention_forward


def _attention_instance(state, shape: Shape, mode: str, ctx) -> Instance:
    cfg, device, dtype = ctx.config, ctx.device, ctx.dtype
    heads, head_dim = cfg.num_attention_heads, cfg.head_dim
    grad = mode != "fwd"
    gen = ctx.generator("attention", shape.label)
    lengths = row_lengths(shape, gen)
    mask = padding_mask(lengths, shape.seq, device).bool() if shape.padded else None
    dims = (shape.batch, heads, shape.seq, head_dim)
    inputs = []
    for _ in range(ctx.inputs_for(3 * math.prod(dims) * _element_size(dtype))):
        inp = {name: randn(dims, gen, device, dtype, requires_grad=grad) for name in "qkv"}
        inp["mask"] = mask
        if grad:
            seed = randn(dims, gen, device, dtype)
            if mask is not None:  # no gradient flows from padded query rows
                seed = seed * mask[:, None, :, None].to(dtype)
            inp["grad_out"] = seed
        inputs.append(inp)
    scale = 1.0 / math.sqrt(head_dim)

    def ours(inp, backend):
        return ops.attention(inp["q"], inp["k"], inp["v"], key_padding_mask=inp["mask"],
                             backend=backend)

    def ref(inp):
        return reference.attention(inp["q"], inp["k"], inp["v"], inp["mask"])

    def sdpa(inp):
        keep = None if inp["mask"] is None else inp["mask"][:, None, None, :]
        return F.scaled_dot_product_attention(inp["q"], inp["k"], inp["v"], attn_mask=keep)

    peers = {"torch-sdpa": sdpa}
    eager = _transformers_eager_attention()
    no_dropout = nn.Module().eval()
    additive = None
    if mask is not None:
        additive = torch.zeros(mask.shape, device=device, dtype=dtype).masked_fill(
            ~mask, torch.finfo(dtype).min)[:, None, None, :]
    if eager is not None:
        def transformers_eager(inp):
            out, _ = eager(no_dropout, inp["q"], inp["k"], inp["v"], additive, scaling=scale)
            return out.transpose(1, 2)  # transformers returns (batch, seq, heads, dim)
        peers["transformers-eager"] = transformers_eager
    wrt = ["q", "k", "v"]
    variants, skipped = _op_variants("attention", ours, ref, peers, mode, wrt, ctx)
    if eager is None:
        skipped["transformers-eager"] = "transformers.models.bert has no eager_attention_forward"

    def real_rows(out, inp):
        tensors = out if isinstance(out, list) else [out]
        if inp["mask"] is None:
            return tensors
        return [t.transpose(1, 2)[inp["mask"]] for t in tensors]

    return Instance(
        inputs=inputs, variants=variants, speed_reference="torch-sdpa",
        oracle=_fp32_oracle(ref, mode, wrt), oracle_name="reference (fp32)",
        tokens=sum(lengths), bound="compute",
        flops=formulas.attention_flops(lengths, heads, head_dim, backward=grad),
        parity_view=real_rows, skipped=skipped,
        details={"heads": heads, "head_dim": head_dim})


# --------------------------------------------------------------------------------------
# layer_norm (with the residual add, as every encoder LayerNorm runs it)
# --------------------------------------------------------------------------------------
def _layer_norm_instance(state, shape: Shape, mode: str, ctx) -> Instance:
    cfg, device, dtype = ctx.config, ctx.device, ctx.dtype
    hidden, eps = cfg.hidden_size, cfg.layer_norm_eps
    rows = shape.batch * shape.seq
    grad = mode != "fwd"
    gen = ctx.generator("layer_norm", shape.label)
    weight = randn((hidden,), gen, device, dtype, 0.1, 1.0, requires_grad=grad)
    bias = randn((hidden,), gen, device, dtype, 0.1, requires_grad=grad)
    inputs = []
    for _ in range(ctx.inputs_for(2 * rows * hidden * _element_size(dtype))):
        inp = {"x": randn((rows, hidden), gen, device, dtype, requires_grad=grad),
               "residual": randn((rows, hidden), gen, device, dtype, requires_grad=grad),
               "weight": weight, "bias": bias}
        if grad:
            inp["grad_out"] = randn((rows, hidden), gen, device, dtype)
        inputs.append(inp)

    def ours(inp, backend):
        return ops.layer_norm(inp["x"], inp["weight"], inp["bias"], eps,
                              residual=inp["residual"], backend=backend)

    def ref(inp):
        return reference.layer_norm(inp["x"], inp["weight"], inp["bias"], eps, inp["residual"])

    def torch_layer_norm(inp):
        return F.layer_norm(inp["x"] + inp["residual"], (hidden,), inp["weight"], inp["bias"], eps)

    wrt = ["x", "residual", "weight", "bias"]
    variants, skipped = _op_variants("layer_norm", ours, ref, {"torch-layer_norm": torch_layer_norm},
                                     mode, wrt, ctx)
    return Instance(
        inputs=inputs, variants=variants, speed_reference="torch-layer_norm",
        oracle=_fp32_oracle(ref, mode, wrt), oracle_name="reference (fp32)",
        tokens=rows, bound="memory",
        bytes=formulas.layer_norm_bytes(rows, hidden, _element_size(dtype), residual=True,
                                        backward=grad),
        skipped=skipped, details={"rows": rows, "hidden": hidden})


# --------------------------------------------------------------------------------------
# bias_gelu (the feed-forward's first activation)
# --------------------------------------------------------------------------------------
def _bias_gelu_instance(state, shape: Shape, mode: str, ctx) -> Instance:
    cfg, device, dtype = ctx.config, ctx.device, ctx.dtype
    features = cfg.intermediate_size
    rows = shape.batch * shape.seq
    grad = mode != "fwd"
    gen = ctx.generator("bias_gelu", shape.label)
    bias = randn((features,), gen, device, dtype, 0.5, requires_grad=grad)
    inputs = []
    for _ in range(ctx.inputs_for(rows * features * _element_size(dtype))):
        inp = {"x": randn((rows, features), gen, device, dtype, requires_grad=grad), "bias": bias}
        if grad:
            inp["grad_out"] = randn((rows, features), gen, device, dtype)
        inputs.append(inp)

    def ours(inp, backend):
        return ops.bias_gelu(inp["x"], inp["bias"], backend=backend)

    def ref(inp):
        return reference.bias_gelu(inp["x"], inp["bias"])

    def torch_gelu(inp):
        return F.gelu(inp["x"] + inp["bias"])

    wrt = ["x", "bias"]
    variants, skipped = _op_variants("bias_gelu", ours, ref, {"torch-gelu": torch_gelu},
                                     mode, wrt, ctx)
    return Instance(
        inputs=inputs, variants=variants, speed_reference="torch-gelu",
        oracle=_fp32_oracle(ref, mode, wrt), oracle_name="reference (fp32)",
        tokens=rows, bound="memory",
        bytes=formulas.bias_gelu_bytes(rows, features, _element_size(dtype), backward=grad),
        skipped=skipped, details={"rows": rows, "features": features})


# --------------------------------------------------------------------------------------
# linear_cross_entropy (the MLM/SBO decoder tied to the word embeddings + loss)
# --------------------------------------------------------------------------------------
def _masked_rows(shape: Shape) -> int:
    return max(1, round(MASK_FRACTION * shape.batch * shape.seq))


def _linear_cross_entropy_instance(state, shape: Shape, mode: str, ctx) -> Instance:
    cfg, device, dtype = ctx.config, ctx.device, ctx.dtype
    hidden, vocab = cfg.hidden_size, cfg.vocab_size
    rows = _masked_rows(shape)
    grad = mode != "fwd"
    gen = ctx.generator("linear_cross_entropy", shape.label)
    weight = randn((vocab, hidden), gen, device, dtype, 0.05, requires_grad=grad)
    bias = randn((vocab,), gen, device, dtype, 0.05, requires_grad=grad)
    inputs = [{"hidden": randn((rows, hidden), gen, device, dtype, requires_grad=grad),
               "labels": torch.randint(0, vocab, (rows,), generator=gen).to(device),
               "weight": weight, "bias": bias}
              for _ in range(ctx.inputs_for(rows * hidden * _element_size(dtype)))]

    def ours(inp, backend):
        return ops.linear_cross_entropy(inp["hidden"], inp["weight"], inp["bias"], inp["labels"],
                                        backend=backend)

    def ref(inp):
        return reference.linear_cross_entropy(inp["hidden"], inp["weight"], inp["bias"],
                                              inp["labels"])

    def torch_linear_ce(inp):
        return F.cross_entropy(F.linear(inp["hidden"], inp["weight"], inp["bias"]), inp["labels"])

    wrt = ["hidden", "weight", "bias"]
    variants, skipped = _op_variants("linear_cross_entropy", ours, ref,
                                     {"torch-linear+cross_entropy": torch_linear_ce}, mode, wrt, ctx)
    return Instance(
        inputs=inputs, variants=variants, speed_reference="torch-linear+cross_entropy",
        oracle=_fp32_oracle(ref, mode, wrt), oracle_name="reference (fp32)",
        tokens=rows, bound="compute",
        flops=formulas.linear_cross_entropy_flops(rows, hidden, vocab, backward=grad),
        skipped=skipped, details={"rows": rows, "hidden": hidden, "vocab": vocab})


# --------------------------------------------------------------------------------------
# span_boundary_head (the SBO MLP over gathered boundaries)
# --------------------------------------------------------------------------------------
_SBO_PARAMS = ("position_table", "w1", "b1", "ln1_weight", "ln1_bias", "w2", "b2",
               "ln2_weight", "ln2_bias")


def _span_boundary_head_instance(state, shape: Shape, mode: str, ctx) -> Instance:
    cfg, device, dtype = ctx.config, ctx.device, ctx.dtype
    hidden, eps = cfg.hidden_size, cfg.layer_norm_eps
    table_rows, width = cfg.sbo_max_targets, cfg.sbo_position_embedding_size
    tokens = shape.batch * shape.seq
    targets = _masked_rows(shape)
    grad = mode != "fwd"
    gen = ctx.generator("span_boundary_head", shape.label)

    def param(dims, scale, shift=0.0):
        return nn.Parameter(randn(dims, gen, device, dtype, scale, shift), requires_grad=grad)

    params = {
        "position_table": param((table_rows, width), 0.5),
        "w1": param((hidden, 2 * hidden + width), 0.03), "b1": param((hidden,), 0.1),
        "ln1_weight": param((hidden,), 0.1, 1.0), "ln1_bias": param((hidden,), 0.1),
        "w2": param((hidden, hidden), 0.04), "b2": param((hidden,), 0.1),
        "ln2_weight": param((hidden,), 0.1, 1.0), "ln2_bias": param((hidden,), 0.1),
    }
    plain = PlainSpanBoundaryHead(*(params[k] for k in _SBO_PARAMS), eps=eps)
    inputs = []
    for _ in range(ctx.inputs_for(tokens * hidden * _element_size(dtype))):
        inp = {"hidden": randn((tokens, hidden), gen, device, dtype, requires_grad=grad),
               "left": torch.randint(0, tokens, (targets,), generator=gen).to(device),
               "right": torch.randint(0, tokens, (targets,), generator=gen).to(device),
               "rel_pos": torch.randint(0, table_rows, (targets,), generator=gen).to(device)}
        inp.update(params)
        if grad:
            inp["grad_out"] = randn((targets, hidden), gen, device, dtype)
        inputs.append(inp)

    def ours(inp, backend):
        return ops.span_boundary_head(inp["hidden"], inp["left"], inp["right"], inp["rel_pos"],
                                      *(inp[k] for k in _SBO_PARAMS), eps, backend=backend)

    def ref(inp):
        return reference.span_boundary_head(inp["hidden"], inp["left"], inp["right"],
                                            inp["rel_pos"], *(inp[k] for k in _SBO_PARAMS), eps)

    def torch_module(inp):
        return plain(inp["hidden"], inp["left"], inp["right"], inp["rel_pos"])

    wrt = ["hidden", *_SBO_PARAMS]
    variants, skipped = _op_variants("span_boundary_head", ours, ref,
                                     {"torch-module": torch_module}, mode, wrt, ctx)
    return Instance(
        inputs=inputs, variants=variants, speed_reference="torch-module",
        oracle=_fp32_oracle(ref, mode, wrt), oracle_name="reference (fp32)",
        tokens=targets, bound="compute",
        flops=formulas.span_boundary_head_flops(targets, hidden, width, backward=grad),
        skipped=skipped, details={"targets": targets, "hidden": hidden, "position_width": width})


OP_CASES = [
    register_case(Case(
        name="attention", group="ops", modes=("fwd", "fwd+bwd"), shapes=_attention_shapes,
        build_instance=_attention_instance,
        description="bidirectional attention with key padding vs F.scaled_dot_product_attention "
                    "and transformers' eager attention")),
    register_case(Case(
        name="layer_norm", group="ops", modes=("fwd", "fwd+bwd"), shapes=_token_shapes,
        build_instance=_layer_norm_instance,
        description="LayerNorm(x + residual) vs F.layer_norm")),
    register_case(Case(
        name="bias_gelu", group="ops", modes=("fwd", "fwd+bwd"), shapes=_token_shapes,
        build_instance=_bias_gelu_instance,
        description="exact GELU(x + bias) vs F.gelu")),
    register_case(Case(
        name="linear_cross_entropy", group="ops", modes=("fwd", "fwd+bwd"), shapes=_token_shapes,
        build_instance=_linear_cross_entropy_instance,
        description="cross-entropy of x @ W.T + b over the vocabulary vs "
                    "F.cross_entropy(F.linear(...))")),
    register_case(Case(
        name="span_boundary_head", group="ops", modes=("fwd", "fwd+bwd"), shapes=_token_shapes,
        build_instance=_span_boundary_head_instance,
        description="the SBO MLP over gathered span boundaries vs a plain torch module")),
]
