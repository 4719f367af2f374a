"""``accelerate(hf_model)``: run an existing transformers BERT's encoder on our ops, in place.

For people who keep transformers (its heads, its ``Trainer``, its checkpoints): every
``transformers.BertModel`` inside ``hf_model`` (``BertModel`` itself, or the ``.bert`` of
``BertForPreTraining``, ``BertForQuestionAnswering``, ``BertForMaskedLM``, ...) gets a
``forward`` that runs :class:`spanbert_fast.SpanBertModel` on the **same Parameter
objects**: the optimizer, ``state_dict``/``save_pretrained`` and ``Trainer`` see exactly the
parameters they saw before, and training updates both at once.

What is honoured and what is not, said out loud rather than silently changed:

* The padding mask reaches the fused kernel (it is read from ``attention_mask``, not from
  transformers' 4-D additive mask).
* ``padding="exact"`` (default) computes padded positions exactly as transformers does
  (padded query rows attend to the real keys), so heads that read them (transformers' QA
  loss does) get the same numbers. ``padding="packed"`` runs the padding-free path (faster:
  no work on padding) and returns zeros at padded positions.
* Per call, arguments the fused path does not implement (``output_attentions=True``,
  ``inputs_embeds``, ``head_mask``, cross-attention inputs, caches) run transformers' own
  forward for that call, with a one-time warning naming the argument.
* ``gradient_checkpointing_enable()`` (before or after ``accelerate``) is honoured: each
  fused layer whose transformers layer has checkpointing on runs through transformers'
  own checkpoint function (same ``gradient_checkpointing_kwargs``, ``every_n_layers``) and
  is recomputed in the backward pass.
* An accelerated model pickles (``torch.save(model)`` / ``torch.load(...,
  weights_only=False)``) and ``copy.deepcopy``-s as itself: still accelerated, the fused
  encoder still sharing the copy's parameters.
* Configs we cannot represent (relative position embeddings, decoders, an activation other
  than exact GELU, ...) are refused by ``accelerate`` with a ValueError listing every reason.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Dict, List

import torch
import torch.utils.checkpoint
from torch import nn

from .config import SpanBertConfig
from .modeling import SpanBertModel

__all__ = ["accelerate", "is_accelerated", "AccelerationError"]

_ATTR = "_spanbert_fast_encoder"
_POSITIONS = "_spanbert_fast_position_ids"
_PADDING_MODES = ("exact", "packed")


class AccelerationError(ValueError):
    """The model (or its config) cannot be accelerated; the message lists why."""


def _is_bert_model(module: nn.Module) -> bool:
    try:
        from transformers import BertModel
    except ImportError:  # accelerate() is only useful with transformers installed
        return False
    return isinstance(module, BertModel)


def _config_reasons(hf_config) -> List[str]:
    reasons = []
    position = getattr(hf_config, "position_embedding_type", "absolute")
    if position not in (None, "absolute"):
        reasons.append(f"position_embedding_type={position!r} (only absolute positions run fused)")
    if getattr(hf_config, "is_decoder", False):
        reasons.append("is_decoder=True (SpanBERT is a bidirectional encoder)")
    if getattr(hf_config, "add_cross_attention", False):
        reasons.append("add_cross_attention=True")
    act = getattr(hf_config, "hidden_act", "gelu")
    if act != "gelu":
        reasons.append(f"hidden_act={act!r} (the fused path implements exact erf GELU)")
    if getattr(hf_config, "chunk_size_feed_forward", 0):
        reasons.append("chunk_size_feed_forward != 0")
    return reasons


def _share_parameters(ours: SpanBertModel, theirs: Dict[str, nn.Parameter]) -> None:
    for name, _ in list(ours.named_parameters()):
        owner_name, _, leaf = name.rpartition(".")
        setattr(ours.get_submodule(owner_name), leaf, theirs[name])


def _follow_the_model(bert: nn.Module, ours: SpanBertModel) -> None:
    """``ours`` is outside ``bert``'s module tree, so ``Module.to()`` / ``.cuda()`` /
    ``.double()`` on the transformers model convert only what ``bert`` holds. Buffers are
    always replaced by such a conversion, and parameters are too where the tensor types are
    not shallow-copy compatible (e.g. ``.to("meta")``) or under
    ``torch.__future__.set_overwrite_module_params_on_conversion(True)``: re-point ``ours``
    at ``bert``'s current tensors. Attribute stores and an identity check only: no copy,
    no device sync."""
    ours.position_ids = getattr(bert, _POSITIONS)
    # A conversion replaces all parameters or none; one identity check tells which.
    if ours.embeddings.word_embeddings.weight is not bert.embeddings.word_embeddings.weight:
        _share_parameters(ours, dict(bert.named_parameters()))


def _shared_encoder(bert: nn.Module, backend: str) -> SpanBertModel:
    """A SpanBertModel whose parameters ARE the transformers model's parameters."""
    values: Dict[str, Any] = bert.config.to_dict()
    values["add_pooling_layer"] = getattr(bert, "pooler", None) is not None
    # transformers has already accepted every key of its config object: keep unknown ones.
    config = SpanBertConfig.from_dict(values, strict=False)
    with torch.device("meta"):  # no memory for weights that are replaced right away
        ours = SpanBertModel(config, backend=backend)
    theirs = dict(bert.named_parameters())
    missing = [name for name, _ in ours.named_parameters() if name not in theirs]
    if missing:
        raise AccelerationError(f"the transformers model lacks parameters {missing[:10]}")
    _share_parameters(ours, theirs)
    # Registered on the transformers model itself (non-persistent: state_dict() unchanged),
    # so hf_model.to(device) / .cuda() moves it; the forward hands it to ``ours``.
    device = next(iter(theirs.values())).device
    bert.register_buffer(_POSITIONS, torch.arange(config.max_position_embeddings, device=device),
                         persistent=False)
    ours.position_ids = getattr(bert, _POSITIONS)
    ours._keep_padded_rows = False
    return ours


def _given(value: Any) -> bool:
    """Whether a forward argument asks for something: anything but None/False. Tensors are
    judged by presence, never by truth value (``bool(tensor)`` raises for more than one
    element, and a tensor of zeros is still an input)."""
    return value is not None and value is not False


def _unsupported_arguments(kwargs: Dict[str, Any]) -> List[str]:
    checks = {
        "output_attentions": "the fused kernel never materialises attention probabilities",
        "inputs_embeds": "the fused path embeds input_ids itself",
        "head_mask": "head masking is not fused",
        "encoder_hidden_states": "cross-attention is not fused",
        "encoder_attention_mask": "cross-attention is not fused",
        "past_key_values": "caches belong to decoders",
        "use_cache": "caches belong to decoders",
    }
    return [f"{name} ({why})" for name, why in checks.items() if _given(kwargs.get(name))]


def _accelerated_forward(self, input_ids=None, attention_mask=None, token_type_ids=None,
                         position_ids=None, **kwargs):
    """Installed as ``bert.forward`` (a ``functools.partial`` binding ``self``: unlike a
    bound method it pickles by reference to this module-level function)."""
    from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

    output_attentions = kwargs.get("output_attentions")
    if output_attentions is None:
        output_attentions = getattr(self.config, "output_attentions", False)
    unsupported = _unsupported_arguments(dict(kwargs, output_attentions=output_attentions))
    if input_ids is None:
        unsupported.append("input_ids=None")
    if unsupported:
        key = tuple(unsupported)
        if key not in _warned:
            _warned.add(key)
            warnings.warn("spanbert_fast.accelerate: running transformers' own BertModel.forward "
                          "for this call because of " + ", ".join(unsupported), stacklevel=2)
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids, position_ids=position_ids,
                                  **kwargs)
    ours: SpanBertModel = getattr(self, _ATTR)
    ours.train(self.training)
    _follow_the_model(self, ours)
    output_hidden_states = kwargs.get("output_hidden_states")
    if output_hidden_states is None:
        output_hidden_states = getattr(self.config, "output_hidden_states", False)
    out = ours(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
               position_ids=position_ids, output_hidden_states=bool(output_hidden_states))
    result = BaseModelOutputWithPoolingAndCrossAttentions(
        last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output,
        hidden_states=out.hidden_states)
    if kwargs.get("return_dict") is False:
        return result.to_tuple()
    return result


_warned: set = set()


def _fused_layer_forward(layer: nn.Module, hf_layer: nn.Module, hf_encoder: nn.Module,
                         *args: Any) -> torch.Tensor:
    """Installed as the ``forward`` of each of our layers: the layer's own forward, or, when
    the transformers layer it mirrors has gradient checkpointing on and is training, that
    forward run through transformers' checkpoint function (``gradient_checkpointing_enable``
    sets both the flag and the function: per layer in transformers 5, on the encoder in
    4.x), so activations inside the layer are recomputed in the backward pass instead of
    kept."""
    run = functools.partial(type(layer).forward, layer)
    for owner in (hf_layer, hf_encoder):
        if getattr(owner, "gradient_checkpointing", False) and owner.training:
            checkpoint = getattr(owner, "_gradient_checkpointing_func", None)
            if checkpoint is None:
                checkpoint = functools.partial(torch.utils.checkpoint.checkpoint,
                                               use_reentrant=False)
            return checkpoint(run, *args)
    return run(*args)


def accelerate(hf_model: nn.Module, *, backend: str = "auto", padding: str = "exact") -> nn.Module:
    """Make every ``transformers.BertModel`` inside ``hf_model`` run on spanbert_fast's ops.

    Returns ``hf_model`` itself (modified in place). ``backend``: ``auto``/``torch``/``triton``
    as for the models. ``padding``: ``"exact"`` (transformers' values at padded positions)
    or ``"packed"`` (padding-free, zeros at padded positions). Raises
    :class:`AccelerationError` listing every reason when the model cannot be accelerated.
    """
    if not isinstance(hf_model, nn.Module):
        raise TypeError(f"hf_model must be a transformers BERT model, got {type(hf_model).__name__}")
    if padding not in _PADDING_MODES:
        raise ValueError(f"padding must be one of {_PADDING_MODES}, got {padding!r}")
    berts = [m for m in hf_model.modules() if _is_bert_model(m)]
    if not berts:
        raise AccelerationError(f"{type(hf_model).__name__} contains no transformers.BertModel "
                                "to accelerate")
    reasons = [f"{type(b).__name__}: {r}" for b in berts for r in _config_reasons(b.config)]
    if reasons:
        raise AccelerationError("cannot accelerate this model:\n  - " + "\n  - ".join(reasons))
    for bert in berts:
        ours = _shared_encoder(bert, backend)
        ours._keep_padded_rows = padding == "exact"
        # Stored outside nn.Module's registry so state_dict()/parameters() are unchanged.
        object.__setattr__(bert, _ATTR, ours)
        for layer, hf_layer in zip(ours.encoder.layer, bert.encoder.layer):
            layer.forward = functools.partial(_fused_layer_forward, layer, hf_layer,
                                              bert.encoder)
        bert.forward = functools.partial(_accelerated_forward, bert)
    return hf_model


def is_accelerated(module: nn.Module) -> bool:
    """True when ``module`` (or a BertModel inside it) runs on spanbert_fast."""
    return any(hasattr(m, _ATTR) for m in module.modules())
