"""The peers our code is measured against: transformers' BERT with the same weights, and
plain-torch modules for the heads (what a user would write without this package).
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from spanbert_fast import SpanBertConfig, SpanBertModel

__all__ = [
    "transformers_bert",
    "ours_from_transformers",
    "load_weights",
    "shared_parameter_names",
    "PlainSpanBoundaryHead",
    "PlainPretrainingHeads",
]

# Keys that may legitimately differ between transformers' BertModel and ours.
_TOLERATED_KEYS = ("pooler.", "embeddings.position_ids")


def transformers_bert(config: SpanBertConfig, attn_implementation: str):
    """A ``transformers.BertModel`` (no pooler, as SpanBERT) for ``config`` with the given
    attention implementation ("eager" or "sdpa"), randomly initialised by transformers."""
    from transformers import BertConfig, BertModel

    values = {k: v for k, v in config.to_dict().items()
              if k not in ("add_pooling_layer", "sbo_max_targets", "sbo_position_embedding_size")}
    hf_config = BertConfig(**values, attn_implementation=attn_implementation)
    model = BertModel(hf_config, add_pooling_layer=False)
    if model.config._attn_implementation != attn_implementation:
        raise RuntimeError(f"transformers gave attention implementation "
                           f"{model.config._attn_implementation!r}, asked for {attn_implementation!r}")
    return model


def _load_checked(target: nn.Module, state: dict) -> None:
    missing, unexpected = target.load_state_dict(state, strict=False)
    bad = [k for k in list(missing) + list(unexpected)
           if not any(k.startswith(p) for p in _TOLERATED_KEYS)]
    if bad:
        raise RuntimeError(f"weights do not line up between transformers and ours: {bad[:8]}")


def ours_from_transformers(hf_model, config: SpanBertConfig, backend: str) -> SpanBertModel:
    """Our encoder with ``hf_model``'s weights. Uses ``SpanBertModel.from_transformers``
    when the checkpoint module provides it, else loads the state dict (the parameter names
    are transformers' own)."""
    try:
        from spanbert_fast import checkpoint  # noqa: F401
        has_converter = hasattr(checkpoint, "from_transformers")
    except ImportError:
        has_converter = False
    if has_converter:
        return SpanBertModel.from_transformers(hf_model, backend=backend)
    model = SpanBertModel(config, backend=backend)
    _load_checked(model, hf_model.state_dict())
    return model


def load_weights(target: nn.Module, source: nn.Module) -> None:
    """Copy ``source``'s weights into ``target`` (transformers <-> ours), checking that
    nothing but the pooler and the position-id buffer is left over."""
    _load_checked(target, source.state_dict())


def shared_parameter_names(*models: nn.Module) -> List[str]:
    """Names of the trainable parameters every model has, sorted (so gradients of
    different implementations line up one to one)."""
    names = None
    for model in models:
        own = {n for n, p in model.named_parameters() if p.requires_grad}
        names = own if names is None else names & own
    return sorted(names or ())


class PlainSpanBoundaryHead(nn.Module):
    """SpanBERT's SBO MLP written with stock modules: gather, concatenate, Linear, GELU,
    LayerNorm, Linear, GELU, LayerNorm. Parameters are given, so that it shares them with
    the other variants (and their gradients line up)."""

    def __init__(self, position_table: nn.Parameter, w1: nn.Parameter, b1: nn.Parameter,
                 ln1_weight: nn.Parameter, ln1_bias: nn.Parameter, w2: nn.Parameter,
                 b2: nn.Parameter, ln2_weight: nn.Parameter, ln2_bias: nn.Parameter,
                 eps: float) -> None:
        super().__init__()
        hidden = w2.shape[0]
        self.position_embeddings = nn.Embedding(*position_table.shape)
        self.position_embeddings.weight = position_table
        self.linear1 = nn.Linear(w1.shape[1], hidden)
        self.linear2 = nn.Linear(hidden, hidden)
        self.layer_norm1 = nn.LayerNorm(hidden, eps=eps)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=eps)
        for module, weight, bias in ((self.linear1, w1, b1), (self.linear2, w2, b2),
                                     (self.layer_norm1, ln1_weight, ln1_bias),
                                     (self.layer_norm2, ln2_weight, ln2_bias)):
            module.weight, module.bias = weight, bias

    def forward(self, hidden: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                rel_pos: torch.Tensor) -> torch.Tensor:
        features = torch.cat([hidden[left], hidden[right], self.position_embeddings(rel_pos)], -1)
        y = self.layer_norm1(F.gelu(self.linear1(features)))
        return self.layer_norm2(F.gelu(self.linear2(y)))


class PlainPretrainingHeads(nn.Module):
    """SpanBERT's MLM + SBO heads and loss in stock torch on top of any encoder output,
    with weights copied from a :class:`spanbert_fast.SpanBertForPreTraining`: the MLM
    transform and decoder on the masked rows, the SBO MLP and decoder on the targets,
    mean cross-entropy of each, summed."""

    def __init__(self, ours) -> None:
        super().__init__()
        config = ours.config
        hidden = config.hidden_size
        eps = config.layer_norm_eps
        mlm = ours.cls.predictions
        sbo = ours.cls.pair_target_predictions
        mlp = sbo.mlp_layer_norm
        self.mlm_dense = nn.Linear(hidden, hidden)
        self.mlm_norm = nn.LayerNorm(hidden, eps=eps)
        self.mlm_bias = nn.Parameter(mlm.bias.detach().clone())
        self.sbo = PlainSpanBoundaryHead(
            *(nn.Parameter(t.detach().clone()) for t in (
                sbo.position_embeddings.weight, mlp.linear1.weight, mlp.linear1.bias,
                mlp.layer_norm1.weight, mlp.layer_norm1.bias, mlp.linear2.weight,
                mlp.linear2.bias, mlp.layer_norm2.weight, mlp.layer_norm2.bias)),
            eps=eps)
        self.sbo_bias = nn.Parameter(sbo.bias.detach().clone())
        with torch.no_grad():
            self.mlm_dense.weight.copy_(mlm.transform.dense.weight)
            self.mlm_dense.bias.copy_(mlm.transform.dense.bias)
            self.mlm_norm.weight.copy_(mlm.transform.LayerNorm.weight)
            self.mlm_norm.bias.copy_(mlm.transform.LayerNorm.bias)

    def forward(self, hidden: torch.Tensor, word_embeddings: torch.Tensor,
                labels: torch.Tensor, sbo_targets: torch.Tensor) -> torch.Tensor:
        batch, seq, width = hidden.shape
        flat = hidden.reshape(batch * seq, width)
        flat_labels = labels.reshape(-1)
        masked = flat_labels != -100
        rows = self.mlm_norm(F.gelu(self.mlm_dense(flat[masked])))
        mlm_logits = F.linear(rows, word_embeddings, self.mlm_bias)
        mlm_loss = F.cross_entropy(mlm_logits.float(), flat_labels[masked])
        row, left, right, rel, label = sbo_targets.unbind(1)
        spans = self.sbo(flat, row * seq + left, row * seq + right, rel)
        sbo_logits = F.linear(spans, word_embeddings, self.sbo_bias)
        return mlm_loss + F.cross_entropy(sbo_logits.float(), label)

