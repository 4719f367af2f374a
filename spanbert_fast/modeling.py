"""SpanBERT models: a drop-in for ``transformers.BertModel`` and its pretraining and QA heads.

Parameter names are exactly transformers' BERT names, so ``state_dict()`` of
:class:`SpanBertModel` loads into ``transformers.BertModel`` and back. Every fused
computation goes through :mod:`spanbert_fast.ops`, which picks the backend.

Padding: outputs at padded positions (``attention_mask == 0``) are zeros on every backend
(transformers fills them with values computed from the real tokens, which no head should
read); ``last_hidden_state`` at real positions matches transformers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .ops import checks
from .config import SpanBertConfig
from .padding import Unpadded, gather_rows, pad_rows, positions_of, unpad

__all__ = [
    "SpanBertModel",
    "SpanBertForPreTraining",
    "SpanBertForQuestionAnswering",
    "SpanBertModelOutput",
    "SpanBertPreTrainingOutput",
    "SpanBertQuestionAnsweringOutput",
    "SBO_TARGET_FIELDS",
    "LAYOUTS",
]

# Columns of the flat SBO target tensor (N, 5) that the sampler produces.
SBO_TARGET_FIELDS = ("row", "left", "right", "rel_pos", "label")

# How the encoder lays out a padded batch (the ``layout`` argument of every model):
# "packed" unpads once before the embeddings, runs every layer on the real tokens only
# (total_tokens, hidden) and repads once at the output; "padded" runs (batch, seq, hidden)
# with a key mask; "auto" packs on the Triton backend always, and on the torch backend
# when the batch's share of real tokens is below PACK_BELOW_REAL_SHARE.
LAYOUTS = ("auto", "packed", "padded")
# Below this share of real tokens the packed layout is faster on the torch backend
# (measured break-even ~97%, BERT-base fp32 on the CPU: see SpanBertModel._runs_packed).
PACK_BELOW_REAL_SHARE = 0.95


# ---------------------------------------------------------------------------------------
# Outputs: dataclasses with transformers' field names; also indexable like its ModelOutput.
# ---------------------------------------------------------------------------------------
class _Output:
    def to_tuple(self) -> tuple:
        return tuple(getattr(self, f) for f in self.__dataclass_fields__ if getattr(self, f) is not None)

    def __getitem__(self, key):
        if isinstance(key, str):
            return getattr(self, key)
        return self.to_tuple()[key]


@dataclass
class SpanBertModelOutput(_Output):
    """``last_hidden_state``: (batch, seq, hidden); ``pooler_output``: (batch, hidden) when the
    config has a pooler; ``hidden_states``: embeddings output then each layer's output."""

    last_hidden_state: torch.Tensor
    pooler_output: Optional[torch.Tensor] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass
class SpanBertPreTrainingOutput(_Output):
    """``loss`` = ``mlm_loss`` + ``sbo_loss`` (each a mean over its targets).
    ``prediction_logits`` (batch, seq, vocab) and ``sbo_logits`` (targets, vocab) only when
    ``return_logits=True``."""

    loss: Optional[torch.Tensor] = None
    mlm_loss: Optional[torch.Tensor] = None
    sbo_loss: Optional[torch.Tensor] = None
    prediction_logits: Optional[torch.Tensor] = None
    sbo_logits: Optional[torch.Tensor] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


@dataclass
class SpanBertQuestionAnsweringOutput(_Output):
    """``start_logits``, ``end_logits``: (batch, seq); padded positions hold the dtype's
    lowest value so that neither softmax nor argmax ever picks them."""

    loss: Optional[torch.Tensor] = None
    start_logits: Optional[torch.Tensor] = None
    end_logits: Optional[torch.Tensor] = None
    hidden_states: Optional[Tuple[torch.Tensor, ...]] = None


# ---------------------------------------------------------------------------------------
# Building blocks (module names mirror transformers' for identical state_dict keys)
# ---------------------------------------------------------------------------------------
class LayerNorm(nn.Module):
    """LayerNorm whose forward optionally adds a residual first, through the fused op."""

    def __init__(self, hidden_size: int, eps: float, backend: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))
        self.eps = eps
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps, residual=residual,
                              backend=self.backend)


class _Dense(nn.Module):
    """A container named like transformers' sub-modules (``.dense`` + optional ``.LayerNorm``)."""

    def __init__(self, in_features: int, out_features: int, config: SpanBertConfig,
                 backend: str, layer_norm: bool) -> None:
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)
        if layer_norm:
            self.LayerNorm = LayerNorm(out_features, config.layer_norm_eps, backend)


class SpanBertEmbeddings(nn.Module):
    def __init__(self, config: SpanBertConfig, backend: str) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size,
                                            padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, config.layer_norm_eps, backend)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids, token_type_ids, position_ids) -> torch.Tensor:
        words = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(words, residual=self.position_embeddings(position_ids)))


class SpanBertSelfAttention(nn.Module):
    def __init__(self, config: SpanBertConfig, backend: str) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query = nn.Linear(h, h)
        self.key = nn.Linear(h, h)
        self.value = nn.Linear(h, h)
        self.dropout_p = config.attention_probs_dropout_prob
        self.backend = backend

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                unpadded: Optional[Unpadded] = None) -> torch.Tensor:
        """``x``: padded ``(batch, seq, hidden)`` with ``key_padding_mask``, or packed
        ``(total_tokens, hidden)`` with ``unpadded`` (cu_seqlens)."""
        dropout_p = self.dropout_p if self.training else 0.0
        width = self.num_heads * self.head_dim
        if unpadded is not None:
            tokens = x.shape[0]

            def heads(t: torch.Tensor) -> torch.Tensor:
                return t.view(tokens, self.num_heads, self.head_dim)

            context = ops.attention(
                heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
                cu_seqlens=unpadded.cu_seqlens, max_seqlen=unpadded.max_seqlen,
                dropout_p=dropout_p, backend=self.backend)
            return context.reshape(tokens, width)
        batch, seq, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)

        context = ops.attention(
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x)),
            key_padding_mask=key_padding_mask, dropout_p=dropout_p, backend=self.backend)
        return context.transpose(1, 2).reshape(batch, seq, width)


class SpanBertAttention(nn.Module):
    def __init__(self, config: SpanBertConfig, backend: str) -> None:
        super().__init__()
        self.self = SpanBertSelfAttention(config, backend)
        self.output = _Dense(config.hidden_size, config.hidden_size, config, backend, True)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                unpadded: Optional[Unpadded] = None) -> torch.Tensor:
        context = self.self(x, key_padding_mask, unpadded)
        return self.output.LayerNorm(self.dropout(self.output.dense(context)), residual=x)


class SpanBertLayer(nn.Module):
    def __init__(self, config: SpanBertConfig, backend: str) -> None:
        super().__init__()
        self.attention = SpanBertAttention(config, backend)
        self.intermediate = _Dense(config.hidden_size, config.intermediate_size, config, backend, False)
        self.output = _Dense(config.intermediate_size, config.hidden_size, config, backend, True)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.backend = backend

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
                unpadded: Optional[Unpadded] = None) -> torch.Tensor:
        """Row-wise except attention, so ``x`` may be padded ``(batch, seq, hidden)`` or
        packed ``(total_tokens, hidden)``."""
        attended = self.attention(x, key_padding_mask, unpadded)
        up = self.intermediate.dense
        inner = ops.bias_gelu(F.linear(attended, up.weight), up.bias, backend=self.backend)
        return self.output.LayerNorm(self.dropout(self.output.dense(inner)), residual=attended)


class SpanBertEncoder(nn.Module):
    def __init__(self, config: SpanBertConfig, backend: str) -> None:
        super().__init__()
        self.layer = nn.ModuleList([SpanBertLayer(config, backend)
                                    for _ in range(config.num_hidden_layers)])


class SpanBertPooler(nn.Module):
    def __init__(self, config: SpanBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden: torch.Tensor,
                first: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``tanh(dense(h))`` of each row's first token: position 0, or ``first`` (batch,)."""
        if first is None:
            token = hidden[:, 0]
        else:
            token = hidden[torch.arange(hidden.shape[0], device=hidden.device), first]
        return torch.tanh(self.dense(token))


# ---------------------------------------------------------------------------------------
# Shared base: construction, weight init, checkpoints
# ---------------------------------------------------------------------------------------
class _SpanBertPreTrainedModel(nn.Module):
    """Common plumbing. ``checkpoint_kind`` tells :mod:`spanbert_fast.checkpoint` which
    layout family this class loads."""

    checkpoint_kind = "model"

    def __init__(self, config: SpanBertConfig, backend: str = "auto",
                 layout: str = "auto") -> None:
        super().__init__()
        if not isinstance(config, SpanBertConfig):
            raise TypeError(f"config must be a SpanBertConfig, got {type(config).__name__}")
        if backend not in ops.BACKENDS:
            raise ValueError(f"backend must be one of {ops.BACKENDS}, got {backend!r}")
        self.config = config
        self.backend = backend
        self.layout = layout
        if backend != "torch":
            # Import triton and the kernels now, eagerly: inside torch.compile's trace of
            # a first forward the import would be a graph break (fullgraph=True fails).
            ops.dispatch.probe_triton()
        # One batched check of every id, label and SBO target per forward (one host sync);
        # False skips it (SPANBERT_FAST_CHECK_VALUES=0 too): bad values are then not caught.
        self.check_values = True

    @property
    def layout(self) -> str:
        """How the encoder lays out a padded batch (:data:`LAYOUTS`); on a model with heads
        it is its encoder's (``self.bert.layout``), so setting either changes both."""
        encoder = self._modules.get("bert") if "_modules" in self.__dict__ else None
        return encoder.layout if encoder is not None else self._layout

    @layout.setter
    def layout(self, value: str) -> None:
        if not isinstance(value, str) or value not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {value!r}")
        encoder = self._modules.get("bert") if "_modules" in self.__dict__ else None
        if encoder is not None:
            encoder.layout = value
        else:
            self._layout = value

    def _init_weights(self) -> None:
        """BERT's initialisation: N(0, initializer_range) weights, zero biases, LN = (1, 0)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    with torch.no_grad():
                        module.weight[module.padding_idx].zero_()
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.tie_weights()

    def _reads_values(self) -> bool:
        """Whether a forward runs the one batched value check (check_values, the
        SPANBERT_FAST_CHECK_VALUES variable, and never while torch.compile traces)."""
        return (self.check_values and checks.values_checkable()
                and os.environ.get(_ENV_CHECK_VALUES, "1").strip() != "0")

    def tie_weights(self) -> None:
        """Point every decoder at the word-embedding matrix (no-op without heads)."""

    @classmethod
    def from_pretrained(cls, path, *, config: Optional[SpanBertConfig] = None,
                        strict: bool = True, backend: str = "auto", layout: str = "auto"):
        """Load any supported checkpoint layout (transformers, original SpanBERT release,
        fairseq with heads) from a directory or file. Returns the model in eval mode.
        ``backend`` and ``layout`` as the constructor takes them."""
        from . import checkpoint
        return checkpoint.load_pretrained(cls, path, config=config, strict=strict,
                                          backend=backend, layout=layout)

    def save_pretrained(self, path) -> None:
        """Write ``config.json`` + ``model.safetensors`` in transformers' layout, atomically."""
        from . import checkpoint
        checkpoint.save_pretrained(self, path)

    @classmethod
    def from_transformers(cls, hf_model, *, backend: str = "auto", layout: str = "auto"):
        """Build this model from an in-memory ``transformers`` BERT model (same weights)."""
        from . import checkpoint
        return checkpoint.from_transformers(cls, hf_model, backend=backend, layout=layout)


def _check_transformers_options(return_dict, output_attentions, head_mask) -> bool:
    """transformers' forward options that a drop-in must at least answer: returns whether
    to return a tuple (``return_dict=False``); refuses what the fused path cannot give."""
    if output_attentions:
        raise ValueError("output_attentions=True is not supported: the fused attention never "
                         "materialises the attention probabilities (use transformers' "
                         "BertModel with attn_implementation='eager' for attention maps)")
    if head_mask is not None:
        raise ValueError("head_mask is not supported (it would need the attention "
                         "probabilities, which the fused attention never materialises)")
    if return_dict is not None and not isinstance(return_dict, bool):
        raise TypeError(f"return_dict must be a bool or None, got {type(return_dict).__name__}")
    return return_dict is False


# What torch's embedding lookup takes as indices.
_ID_DTYPES = (torch.int64, torch.int32)


def _validate_inputs(config: SpanBertConfig, input_ids, attention_mask, token_type_ids,
                     position_ids) -> None:
    """Types, shapes and devices of the encoder inputs (no tensor data is read: their
    values are checked in one batched reduction, :func:`_check_values_once`)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dtype not in _ID_DTYPES:
        raise TypeError(f"input_ids must be an integer tensor of int64 or int32, got "
                        f"{input_ids.dtype}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, seq), got shape {tuple(input_ids.shape)}")
    batch, seq = input_ids.shape
    if batch == 0 or seq == 0:
        raise ValueError(f"input_ids must hold at least one token per row and one row, "
                         f"got shape {tuple(input_ids.shape)}")
    if seq > config.max_position_embeddings and position_ids is None:
        raise ValueError(f"input_ids has sequence length {seq}, longer than "
                         f"max_position_embeddings={config.max_position_embeddings}")
    # token_type_ids and position_ids may be (1, seq), shared by every row (as transformers
    # broadcasts them); the mask is per row.
    checks = ((attention_mask, "attention_mask", False), (token_type_ids, "token_type_ids", True),
              (position_ids, "position_ids", True))
    for t, name, ids in checks:
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != (batch, seq) and not (ids and tuple(t.shape) == (1, seq)):
            shared = f" or {(1, seq)}" if ids else ""
            raise ValueError(f"{name} must have the shape of input_ids {(batch, seq)}{shared}, "
                             f"got {tuple(t.shape)}")
        if ids and t.dtype not in _ID_DTYPES:
            raise TypeError(f"{name} must be an integer tensor of int64 or int32, got {t.dtype}")
        if t.is_complex():
            raise TypeError(f"{name} must be a real tensor, got {t.dtype}")
        if t.device != input_ids.device:
            raise ValueError(f"{name} is on {t.device} but input_ids is on {input_ids.device}")


def _validate_unpadded(unpadded, batch: int, seq: int, device) -> None:
    """Types, shapes and devices of a caller's packed layout (``unpadded=``); its values
    are checked in the batched reduction (:func:`_check_values_once`)."""
    if not isinstance(unpadded, Unpadded):
        raise TypeError(f"unpadded must be a spanbert_fast.padding.Unpadded (from "
                        f"SpanMaskingCollator(packed=True) or padding.unpad_lengths), got "
                        f"{type(unpadded).__name__}")
    if (unpadded.batch, unpadded.seq) != (batch, seq):
        raise ValueError(f"unpadded describes a ({unpadded.batch}, {unpadded.seq}) batch but "
                         f"input_ids has shape {(batch, seq)}")
    for name, t, dtypes in (("unpadded.indices", unpadded.indices, (torch.int64,)),
                            ("unpadded.cu_seqlens", unpadded.cu_seqlens,
                             (torch.int32, torch.int64))):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in dtypes:
            what = (f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, torch.Tensor)
                    else type(t).__name__)
            raise TypeError(f"{name} must be a 1-D {' or '.join(map(str, dtypes))} tensor, "
                            f"got {what}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but input_ids is on {device} (move "
                             f"the batch with unpadded.to(device))")
    if unpadded.cu_seqlens.numel() < batch + 1:
        raise ValueError(f"unpadded.cu_seqlens must hold at least batch + 1 = {batch + 1} "
                         f"entries, got {unpadded.cu_seqlens.numel()}")
    if (isinstance(unpadded.max_seqlen, bool) or not isinstance(unpadded.max_seqlen, int)
            or unpadded.max_seqlen < 1):
        raise ValueError(f"unpadded.max_seqlen must be a positive Python int, got "
                         f"{unpadded.max_seqlen!r}")


def _validate_mlm_positions(mlm_positions, labels, batch: int, seq: int, device) -> None:
    if labels is None:
        raise ValueError("mlm_positions needs labels (the MLM targets it points at)")
    if not isinstance(mlm_positions, torch.Tensor) or mlm_positions.dim() != 1 \
            or mlm_positions.dtype != torch.int64:
        what = (f"{mlm_positions.dtype} of shape {tuple(mlm_positions.shape)}"
                if isinstance(mlm_positions, torch.Tensor) else type(mlm_positions).__name__)
        raise TypeError(f"mlm_positions must be a 1-D int64 tensor of flat positions "
                        f"row * seq + s, got {what}")
    if mlm_positions.device != device:
        raise ValueError(f"mlm_positions is on {mlm_positions.device} but input_ids is on "
                         f"{device}")


def _unpadded_bad_counts(unpadded: Unpadded, valid: Optional[torch.Tensor], batch: int,
                         seq: int) -> list:
    """``(message, count of violations)`` of a caller's packed layout, as device tensors
    for the one batched read. Together they say: ``cu_seqlens`` starts at 0, never
    decreases, has each row's real length (from the mask) in its first ``batch`` steps,
    every step at most ``max_seqlen``, and ends at ``total_tokens``; ``indices`` holds
    exactly the real positions in order, then fillers (``batch * seq``)."""
    slots = batch * seq
    cu = unpadded.cu_seqlens.to(torch.int64)
    steps = cu[1:] - cu[:-1]
    if valid is not None:
        lengths = valid.sum(dim=1)
    else:
        lengths = torch.full((batch,), seq, dtype=torch.int64, device=cu.device)
    indices = unpadded.indices
    top = slots if unpadded.has_filler else slots - 1
    real = indices < slots
    flags = (valid.reshape(-1) if valid is not None
             else torch.ones(slots, dtype=torch.bool, device=cu.device))
    on_real_token = flags[indices.clamp(0, slots - 1)]
    order = indices[1:] - indices[:-1]
    return [
        (f"unpadded.cu_seqlens must start at 0 and end at total_tokens={indices.numel()}",
         (cu[0] != 0).to(torch.int64) + (cu[-1] != indices.numel()).to(torch.int64)),
        (f"unpadded.cu_seqlens must be non-decreasing with steps <= max_seqlen="
         f"{unpadded.max_seqlen}", ((steps < 0) | (steps > unpadded.max_seqlen)).sum()),
        ("unpadded.cu_seqlens must hold each row's real length (the attention_mask's row "
         "sums) in its first batch steps", (steps[:batch] != lengths).sum()),
        (f"unpadded.indices must lie in [0, {top}]" + (" (batch * seq marks a filler token)"
                                                        if unpadded.has_filler else ""),
         ((indices < 0) | (indices > top)).sum()),
        ("unpadded.indices must be the flat positions row * seq + s of the real tokens "
         "(attention_mask 1), in order, then the fillers",
         (real & ~on_real_token).sum() + (order < 0).sum()
         + ((order == 0) & real[1:]).sum()
         + (real.sum() != cu[batch]).to(torch.int64)),
    ]


def _mlm_positions_bad_counts(mlm_positions: torch.Tensor, masked: torch.Tensor,
                              flat_labels: torch.Tensor, slots: int) -> list:
    """``mlm_positions`` must be exactly the masked positions (labels != -100) in order,
    then fillers (``batch * seq``, static shapes)."""
    real = mlm_positions < slots
    at = flat_labels[mlm_positions.clamp(0, slots - 1)] != -100
    order = mlm_positions[1:] - mlm_positions[:-1]
    return [
        (f"mlm_positions must lie in [0, {slots}] ({slots} = batch * seq marks a filler)",
         ((mlm_positions < 0) | (mlm_positions > slots)).sum()),
        ("mlm_positions must be the flat positions row * seq + s of every label != -100, "
         "in order, then the fillers (batch * seq)",
         (real & ~at).sum() + (order < 0).sum() + ((order == 0) & real[1:]).sum()
         + (real.sum() != masked.sum()).to(torch.int64)),
    ]


def _check_input_values(config: SpanBertConfig, input_ids, attention_mask, token_type_ids,
                        position_ids) -> None:
    """The encoder inputs' values, one argument at a time (a host sync each): run only
    once :func:`_check_values_once` found something wrong, to say exactly what."""
    checks.check_index_range("input_ids", input_ids, 0, config.vocab_size)
    if token_type_ids is not None:
        checks.check_index_range("token_type_ids", token_type_ids, 0, config.type_vocab_size)
    if position_ids is not None:
        checks.check_index_range("position_ids", position_ids, 0, config.max_position_embeddings)
    if attention_mask is not None and attention_mask.numel():
        bad = (attention_mask != 0) & (attention_mask != 1)
        if bool(bad.any()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token); for an "
                             "additive float mask use ops.attention(attn_bias=...)")


# SPANBERT_FAST_CHECK_VALUES=0 switches the models' value checks off (as check_values=False).
_ENV_CHECK_VALUES = "SPANBERT_FAST_CHECK_VALUES"


@dataclass
class _Checked:
    """What a forward's one batched value check read back (host ints): the number of real
    positions, the longest row's real length, and (with MLM labels) the masked rows."""

    real_tokens: int
    longest: int
    masked: Optional[int] = None
    right_padded: Optional[bool] = None  # the mask is ones then zeros in every row


def _check_values_once(config: SpanBertConfig, input_ids, attention_mask, valid,
                       token_type_ids, position_ids, labels=None, sbo_targets=None,
                       unpadded: Optional[Unpadded] = None,
                       mlm_positions: Optional[torch.Tensor] = None) -> _Checked:
    """Every value check of a forward (and of a pretraining step's labels and SBO targets)
    as counts reduced into one tensor, read back in ONE host synchronisation together with
    the sizes the step needs (real tokens, longest row, masked rows), so that the ops and
    the unpadding then read nothing more. When a count is not zero, the per-argument checks
    run to raise their precise ValueError (the slow path is the error path). A caller's
    packed layout (``unpadded``, ``mlm_positions``) is checked against the mask and the
    labels in the same read; its counts carry their own message."""
    batch, seq = input_ids.shape
    bad = []
    labelled = []  # (message, count): checks whose message is known up front
    bad.append(((input_ids < 0) | (input_ids >= config.vocab_size)).sum())
    if token_type_ids is not None:
        bad.append(((token_type_ids < 0) | (token_type_ids >= config.type_vocab_size)).sum())
    if position_ids is not None:
        bad.append(((position_ids < 0)
                    | (position_ids >= config.max_position_embeddings)).sum())
    if attention_mask is not None:
        bad.append(((attention_mask != 0) & (attention_mask != 1)).sum())
    sizes = []
    if valid is not None:
        lengths = valid.sum(dim=1)
        # Right padding has no padding-then-token step in any row (the padded Triton
        # attention reads key lengths; accelerate(padding="exact") runs it).
        gaps = (valid[:, 1:] & ~valid[:, :-1]).sum()
        sizes += [lengths.sum(), lengths.max(), gaps]
    if labels is not None:
        masked = labels != -100
        bad.append((masked & ((labels < 0) | (labels >= config.vocab_size))).sum())
        sizes.append(masked.sum())
        if mlm_positions is not None:
            labelled += _mlm_positions_bad_counts(mlm_positions, masked, labels.reshape(-1),
                                                  batch * seq)
    if unpadded is not None:
        labelled += _unpadded_bad_counts(unpadded, valid, batch, seq)
    if sbo_targets is not None and sbo_targets.numel():
        row, left, right, rel, label = sbo_targets.unbind(1)
        target = left + 1 + rel
        # label -100: an ignored target (the filler rows of static shapes); its indices
        # must still be in range (they are gathered), not its span.
        kept = label != -100
        out_of_range = ((row < 0) | (row >= batch) | (left < 0) | (left >= seq) | (right < 0)
                        | (right >= seq) | (rel < 0) | (rel >= config.sbo_max_targets)
                        | (kept & ((label < 0) | (label >= config.vocab_size)
                                   | (target >= right))))
        bad.append(out_of_range.sum())
        if valid is not None:
            # Boundaries and target on real tokens (clamped reads: a bad index is counted
            # above and must not fault here).
            rows = row.clamp(0, batch - 1)
            real = (valid[rows, left.clamp(0, seq - 1)] & valid[rows, right.clamp(0, seq - 1)]
                    & valid[rows, target.clamp(0, seq - 1)])
            bad.append((kept & ~real).sum())
    counts = bad + [count for _, count in labelled]
    values = torch.stack([t.to(torch.int64) for t in counts + sizes]).tolist()  # the one sync
    if any(values[:len(bad)]):
        _check_input_values(config, input_ids, attention_mask, token_type_ids, position_ids)
        if labels is not None:
            _check_label_values(labels, config.vocab_size)
        if sbo_targets is not None:
            _check_sbo_values(sbo_targets, batch, seq, config, valid)
        raise ValueError("the batched value check found an out-of-range id, label or SBO "
                         "target that the per-argument checks did not")  # pragma: no cover
    for (message, _), value in zip(labelled, values[len(bad):len(counts)]):
        if value:
            raise ValueError(message)
    sizes = values[len(counts):]
    right_padded = True
    if valid is not None:
        real_tokens, longest, right_padded = sizes[0], sizes[1], sizes[2] == 0
        sizes = sizes[3:]
    else:
        real_tokens, longest = batch * seq, seq
    return _Checked(real_tokens=real_tokens, longest=longest,
                    masked=sizes[0] if labels is not None else None, right_padded=right_padded)


def _check_label_values(labels: torch.Tensor, vocab_size: int) -> None:
    flat = labels.reshape(-1)
    checks.check_index_range("labels", flat[flat != -100], 0, vocab_size)


class SpanBertModel(_SpanBertPreTrainedModel):
    """The SpanBERT/BERT encoder: embeddings -> N transformer layers (-> optional pooler).

    Drop-in for ``transformers.BertModel``: same parameter names, same ``forward``
    arguments and output field names.
    """

    checkpoint_kind = "model"

    def __init__(self, config: SpanBertConfig, backend: str = "auto",
                 add_pooling_layer: Optional[bool] = None, layout: str = "auto") -> None:
        super().__init__(config, backend, layout)
        if add_pooling_layer is not None and add_pooling_layer != config.add_pooling_layer:
            config = config.replace(add_pooling_layer=bool(add_pooling_layer))
            self.config = config
        self.embeddings = SpanBertEmbeddings(config, backend)
        self.encoder = SpanBertEncoder(config, backend)
        self.pooler = SpanBertPooler(config) if config.add_pooling_layer else None
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings),
                             persistent=False)
        # Set by spanbert_fast.accelerate(padding="exact"): compute padded positions as
        # transformers does (no padding-free path, no zeroing) for heads that read them.
        self._keep_padded_rows = False
        self._init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
        *,
        return_dict: Optional[bool] = None,
        output_attentions: bool = False,
        head_mask: Optional[torch.Tensor] = None,
        unpadded: Optional[Unpadded] = None,
    ) -> SpanBertModelOutput:
        """``input_ids`` (batch, seq) int; ``attention_mask`` (batch, seq) 0/1 (1 = token);
        ``token_type_ids`` / ``position_ids`` (batch, seq) or (1, seq) int. Returns
        :class:`SpanBertModelOutput` (a tuple of its non-None fields if
        ``return_dict=False``); outputs at padded positions are zeros.
        ``output_attentions`` and ``head_mask`` are refused with a ValueError.

        ``unpadded``: the batch's packed layout, known on the host
        (:class:`spanbert_fast.padding.Unpadded`, from ``SpanMaskingCollator(packed=True)``
        or :func:`spanbert_fast.padding.unpad_lengths`): the encoder then runs packed
        whatever the ``layout`` (under ``torch.compile`` too) and reads nothing from the
        device to unpad; with ``check_values = False`` a forward reads nothing at all."""
        as_tuple = _check_transformers_options(return_dict, output_attentions, head_mask)
        _validate_inputs(self.config, input_ids, attention_mask, token_type_ids, position_ids)
        if unpadded is not None:
            _validate_unpadded(unpadded, *input_ids.shape, input_ids.device)
        checked = None
        if self._reads_values():
            checked = _check_values_once(
                self.config, input_ids, attention_mask,
                attention_mask != 0 if attention_mask is not None else None,
                token_type_ids, position_ids, unpadded=unpadded)
        with ops.values_checked(None if checked is None else checked.right_padded):
            out = self._encode(input_ids, attention_mask, token_type_ids, position_ids,
                               output_hidden_states, checked, unpadded)
        return out.to_tuple() if as_tuple else out

    def _encode(self, input_ids, attention_mask, token_type_ids, position_ids,
                output_hidden_states, checked: Optional[_Checked],
                unpadded: Optional[Unpadded] = None) -> SpanBertModelOutput:
        """The forward once the inputs are checked: ``checked`` holds what the batched
        check read (None when value checks are off or under torch.compile); ``unpadded``
        the caller's packed layout, if any."""
        batch, seq = input_ids.shape
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        else:
            token_type_ids = token_type_ids.expand(batch, seq)
        if position_ids is None:
            position_ids = self.position_ids[:seq].unsqueeze(0).expand(batch, seq)
        else:
            position_ids = position_ids.expand(batch, seq)
        valid = None
        real_share = 0.0  # unknown (checks off, or torch.compile): counts as padded
        if attention_mask is not None:
            valid = attention_mask != 0
            if checked is not None:
                real_share = checked.real_tokens / valid.numel()
                if checked.real_tokens == valid.numel():
                    valid = None  # no padding: skip the masking work entirely
        collected = [] if output_hidden_states else None
        if unpadded is not None or self._runs_packed(input_ids, valid, real_share):
            hidden = self._encode_packed(input_ids, token_type_ids, position_ids, valid,
                                         collected, checked, unpadded)
        else:
            hidden = self.embeddings(input_ids, token_type_ids, position_ids)
            keep = None
            if valid is not None and not self._keep_padded_rows:
                keep = valid.unsqueeze(-1).to(hidden.dtype)
            for layer in self.encoder.layer:
                if collected is not None:
                    collected.append(hidden if keep is None else hidden * keep)
                hidden = layer(hidden, valid)
            if keep is not None:
                hidden = hidden * keep
            if collected is not None:
                collected.append(hidden)
        pooled = None
        if self.pooler is not None:
            first = None
            if valid is not None and not self._keep_padded_rows:
                # Padded positions are zeros here: pool each row's first real token (its
                # [CLS]), which is position 0 unless the row is left-padded.
                first = valid.int().argmax(1)
            pooled = self.pooler(hidden, first)
        return SpanBertModelOutput(last_hidden_state=hidden, pooler_output=pooled,
                                   hidden_states=tuple(collected) if collected is not None
                                   else None)

    def _runs_packed(self, input_ids: torch.Tensor, valid: Optional[torch.Tensor],
                     real_share: float) -> bool:
        """Whether this batch runs the padding-free (packed) path; see :data:`LAYOUTS`.

        ``accelerate(padding="exact")`` (transformers' values at padded positions) and
        torch.compile (unpadding has a data-dependent size) keep the padded path whatever
        the layout. On the Triton backend "auto" always packs. On the torch backend it
        packs a batch with padding whose real-token share is below PACK_BELOW_REAL_SHARE:
        (A caller's ``unpadded`` layout always runs packed, compiled or not: its sizes are
        host ints, so nothing is data-dependent.)
        the dense layers (~95% of the FLOPs at SpanBERT's lengths) then skip the padding,
        and only attention sees a repadded block. Measured on the 2-core AMD EPYC CPU
        (BERT-base fp32, forward, 16 x 128, one thread, median of 3): packed/padded time
        0.46 at 40% real tokens, 0.72 at 70%, 0.83 at 85%, 0.91 at 90%, 0.97 at 95%, 1.005
        at 98% (there the gathers cost what the padding saves).
        """
        if self._keep_padded_rows or torch.compiler.is_compiling():
            return False
        if self.layout != "auto":
            return self.layout == "packed"
        if ops.resolve_backend(self.backend, "attention", [input_ids]) == "triton":
            return True
        return valid is not None and real_share < PACK_BELOW_REAL_SHARE

    def _encode_packed(self, input_ids, token_type_ids, position_ids, valid, collected,
                       checked: Optional[_Checked] = None,
                       where: Optional[Unpadded] = None):
        """Unpad once before the embeddings, run every layer on (total_tokens, hidden) with
        the packed attention, repad once at the end (zeros at padded positions). With the
        caller's layout (``where``) or the batched check's sizes the unpadding reads
        nothing from the device."""
        if where is None:
            mask = valid if valid is not None else torch.ones_like(input_ids, dtype=torch.bool)
            where = unpad(mask, total_tokens=None if checked is None else checked.real_tokens,
                          longest=None if checked is None else checked.longest)

        def gather(t: torch.Tensor) -> torch.Tensor:
            return gather_rows(t, where)

        hidden = self.embeddings(gather(input_ids), gather(token_type_ids), gather(position_ids))
        for layer in self.encoder.layer:
            if collected is not None:
                collected.append(pad_rows(hidden, where))
            hidden = layer(hidden, None, where)
        hidden = pad_rows(hidden, where)
        if collected is not None:
            collected.append(hidden)
        return hidden


class SpanBertLMPredictionHead(nn.Module):
    """MLM head: dense -> GELU -> LN, then the decoder tied to the word embeddings + bias."""

    def __init__(self, config: SpanBertConfig, backend: str) -> None:
        super().__init__()
        self.transform = _Dense(config.hidden_size, config.hidden_size, config, backend, True)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.backend = backend

    def transform_rows(self, rows: torch.Tensor) -> torch.Tensor:
        dense = self.transform.dense
        return self.transform.LayerNorm(
            ops.bias_gelu(F.linear(rows, dense.weight), dense.bias, backend=self.backend))


class SpanBertMLPWithLayerNorm(nn.Module):
    """The SBO MLP's parameters, named as in the original release (``mlp_layer_norm``)."""

    def __init__(self, config: SpanBertConfig, backend: str) -> None:
        super().__init__()
        h = config.hidden_size
        self.linear1 = nn.Linear(2 * h + config.sbo_position_embedding_size, h)
        self.layer_norm1 = LayerNorm(h, config.layer_norm_eps, backend)
        self.linear2 = nn.Linear(h, h)
        self.layer_norm2 = LayerNorm(h, config.layer_norm_eps, backend)


class SpanBertPairTargetPredictionHead(nn.Module):
    """The span-boundary objective head (SBO), as DESIGN.md and the release define it."""

    def __init__(self, config: SpanBertConfig, backend: str) -> None:
        super().__init__()
        self.position_embeddings = nn.Embedding(config.sbo_max_targets,
                                                config.sbo_position_embedding_size)
        self.mlp_layer_norm = SpanBertMLPWithLayerNorm(config, backend)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.eps = config.layer_norm_eps
        self.backend = backend

    def represent(self, hidden_flat: torch.Tensor, left_index: torch.Tensor,
                  right_index: torch.Tensor, rel_pos: torch.Tensor) -> torch.Tensor:
        """(tokens, H) rows and (N,) flat boundary indices -> (N, H) span representations."""
        mlp = self.mlp_layer_norm
        return ops.span_boundary_head(
            hidden_flat, left_index, right_index, rel_pos, self.position_embeddings.weight,
            mlp.linear1.weight, mlp.linear1.bias, mlp.layer_norm1.weight, mlp.layer_norm1.bias,
            mlp.linear2.weight, mlp.linear2.bias, mlp.layer_norm2.weight, mlp.layer_norm2.bias,
            self.eps, backend=self.backend)


class SpanBertPreTrainingHeads(nn.Module):
    def __init__(self, config: SpanBertConfig, backend: str) -> None:
        super().__init__()
        self.predictions = SpanBertLMPredictionHead(config, backend)
        self.pair_target_predictions = SpanBertPairTargetPredictionHead(config, backend)


def _validate_sbo_targets(sbo_targets, batch: int, seq: int, config: SpanBertConfig,
                          valid: Optional[torch.Tensor], device) -> None:
    """``valid``: (batch, seq) bool, True at real tokens, or None (every position real)."""
    if not isinstance(sbo_targets, torch.Tensor):
        raise TypeError(f"sbo_targets must be a torch.Tensor, got {type(sbo_targets).__name__}")
    if sbo_targets.dim() != 2 or sbo_targets.shape[1] != len(SBO_TARGET_FIELDS):
        raise ValueError(f"sbo_targets must have shape (num_targets, 5) with columns "
                         f"{SBO_TARGET_FIELDS}, got {tuple(sbo_targets.shape)}")
    if sbo_targets.dtype != torch.int64:
        raise TypeError(f"sbo_targets must be int64, got {sbo_targets.dtype}")
    if sbo_targets.device != device:
        raise ValueError(f"sbo_targets is on {sbo_targets.device} but input_ids is on {device}")


def _check_sbo_values(sbo_targets: torch.Tensor, batch: int, seq: int, config: SpanBertConfig,
                      valid: Optional[torch.Tensor]) -> None:
    """The SBO targets' values, column by column (host syncs): run only once
    :func:`_check_values_once` found something wrong, to say exactly what."""
    kept = sbo_targets[:, 4] != -100  # ignored targets (static shapes' fillers)
    checks.check_index_range("sbo_targets[:, 0] (row)", sbo_targets[:, 0], 0, batch)
    checks.check_index_range("sbo_targets[:, 1] (left)", sbo_targets[:, 1], 0, seq)
    checks.check_index_range("sbo_targets[:, 2] (right)", sbo_targets[:, 2], 0, seq)
    checks.check_index_range("sbo_targets[:, 3] (rel_pos)", sbo_targets[:, 3], 0,
                             config.sbo_max_targets)
    sbo_targets = sbo_targets[kept]
    if sbo_targets.numel() == 0:
        return
    row, left, right, rel, label = sbo_targets.unbind(1)
    checks.check_index_range("sbo_targets[:, 0] (row)", row, 0, batch)
    checks.check_index_range("sbo_targets[:, 1] (left)", left, 0, seq)
    checks.check_index_range("sbo_targets[:, 2] (right)", right, 0, seq)
    checks.check_index_range("sbo_targets[:, 3] (rel_pos)", rel, 0, config.sbo_max_targets)
    checks.check_index_range("sbo_targets[:, 4] (label)", label, 0, config.vocab_size)
    target_pos = left + 1 + rel
    if bool((target_pos >= right).any()):
        raise ValueError("sbo_targets must satisfy left + 1 + rel_pos < right (the target lies "
                         "strictly between its boundaries)")
    if valid is not None:
        # Boundaries and target must be real tokens wherever the padding is (left, right or
        # gaps): a boundary on padding would read a zero hidden state. One sync on the
        # training step's path; the columns are told apart only once one failed.
        columns = ((1, "left", left), (2, "right", right), (None, "left + 1 + rel_pos", target_pos))
        real = valid[row.unsqueeze(0), torch.stack([position for _, _, position in columns])]
        if bool(real.all()):
            return
        for (column, name, position), real_here in zip(columns, real):
            on_padding = ~real_here
            if bool(on_padding.any()):
                k = int(on_padding.nonzero()[0, 0])
                where = f"sbo_targets[:, {column}] ({name})" if column else f"the target ({name})"
                raise ValueError(f"{where} must be a real token (attention_mask 1): target {k} "
                                 f"has it on padding, at row {int(row[k])}, position "
                                 f"{int(position[k])}")


class SpanBertForPreTraining(_SpanBertPreTrainedModel):
    """SpanBERT pretraining: masked-LM head plus the span-boundary objective (no NSP).

    ``loss = mean MLM cross-entropy over masked tokens + mean SBO cross-entropy over SBO
    targets``. Both decoders are tied to the word embeddings and have their own bias.
    """

    checkpoint_kind = "pretraining"

    def __init__(self, config: SpanBertConfig, backend: str = "auto",
                 layout: str = "auto") -> None:
        super().__init__(config, backend, layout)
        self.bert = SpanBertModel(config, backend, layout=layout)
        self.cls = SpanBertPreTrainingHeads(config, backend)
        self._init_weights()

    def tie_weights(self) -> None:
        embeddings = self.bert.embeddings.word_embeddings.weight
        self.cls.predictions.decoder.weight = embeddings
        self.cls.pair_target_predictions.decoder.weight = embeddings

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        labels: Optional[torch.Tensor] = None,
        sbo_targets: Optional[torch.Tensor] = None,
        return_logits: bool = False,
        output_hidden_states: bool = False,
        *,
        unpadded: Optional[Unpadded] = None,
        mlm_positions: Optional[torch.Tensor] = None,
    ) -> SpanBertPreTrainingOutput:
        """``labels``: (batch, seq) int64 MLM targets, -100 where not masked (transformers'
        convention). ``sbo_targets``: (N, 5) int64 rows ``(row, left, right, rel_pos, label)``:
        batch row, the span's outer boundary positions ``s-1`` and ``e+1``, the target's offset
        inside the span and its token id. The MLM head runs only on the masked rows.

        Every id, label and SBO target is checked in one batched reduction per step (one
        host synchronisation, which also reads the sizes the step needs); then no op reads
        the device again (``check_values=False`` skips the check).

        Packed inputs from ``SpanMaskingCollator(packed=True)``: ``unpadded`` (see
        :meth:`SpanBertModel.forward`) and ``mlm_positions`` ``(M,)`` int64, the flat
        positions ``row * seq + s`` of the labels != -100 in order (then ``batch * seq``
        fillers under static shapes). With both the step needs no size from the device:
        the batched check still runs (one read) unless ``check_values = False``, and then
        the step reads nothing. SBO targets with label -100 are ignored (fillers)."""
        _validate_inputs(self.config, input_ids, attention_mask, token_type_ids, position_ids)
        batch, seq = input_ids.shape
        if labels is not None:
            if not isinstance(labels, torch.Tensor):
                raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
            if tuple(labels.shape) != (batch, seq):
                raise ValueError(f"labels must have the shape of input_ids {(batch, seq)}, "
                                 f"got {tuple(labels.shape)}")
            if labels.dtype != torch.int64:
                raise TypeError(f"labels must be int64 (-100 = not masked), got {labels.dtype}")
        valid = attention_mask != 0 if attention_mask is not None else None
        if sbo_targets is not None:
            _validate_sbo_targets(sbo_targets, batch, seq, self.config, valid, input_ids.device)
        if unpadded is not None:
            _validate_unpadded(unpadded, batch, seq, input_ids.device)
        if mlm_positions is not None:
            _validate_mlm_positions(mlm_positions, labels, batch, seq, input_ids.device)
        checked = None
        if self._reads_values():
            checked = _check_values_once(self.config, input_ids, attention_mask, valid,
                                         token_type_ids, position_ids, labels, sbo_targets,
                                         unpadded, mlm_positions)
        with ops.values_checked(None if checked is None else checked.right_padded):
            return self._heads(input_ids, attention_mask, token_type_ids, position_ids, labels,
                               sbo_targets, return_logits, output_hidden_states, checked,
                               unpadded, mlm_positions)

    def _heads(self, input_ids, attention_mask, token_type_ids, position_ids, labels,
               sbo_targets, return_logits, output_hidden_states,
               checked: Optional[_Checked], unpadded: Optional[Unpadded] = None,
               mlm_positions: Optional[torch.Tensor] = None) -> SpanBertPreTrainingOutput:
        out = self.bert._encode(input_ids, attention_mask, token_type_ids, position_ids,
                                output_hidden_states, checked, unpadded)
        hidden = out.last_hidden_state
        batch, seq, width = hidden.shape
        flat = hidden.reshape(batch * seq, width)
        heads = self.cls
        embeddings = self.bert.embeddings.word_embeddings.weight

        mlm_loss = sbo_loss = prediction_logits = sbo_logits = None
        if labels is not None and mlm_positions is not None:
            # The caller's positions: fillers (batch * seq) read the last row and an
            # ignored label (-100), so the loss is the mean over the real ones.
            slots = batch * seq
            mlm_labels = F.pad(labels.reshape(-1), (0, 1), value=-100).index_select(
                0, mlm_positions)
            mlm_loss = ops.linear_cross_entropy(
                heads.predictions.transform_rows(
                    flat.index_select(0, mlm_positions.clamp(max=slots - 1))),
                embeddings, heads.predictions.bias, mlm_labels, backend=self.backend)
        elif labels is not None:
            flat_labels = labels.reshape(-1)
            if checks.values_checkable():
                rows = positions_of(flat_labels != -100,
                                     None if checked is None else checked.masked)
            else:
                rows = torch.arange(flat_labels.numel(), device=labels.device)
            mlm_loss = ops.linear_cross_entropy(
                heads.predictions.transform_rows(flat.index_select(0, rows)), embeddings,
                heads.predictions.bias, flat_labels.index_select(0, rows), backend=self.backend)
        if sbo_targets is not None:
            row, left, right, rel, label = sbo_targets.unbind(1)
            sbo_hidden = heads.pair_target_predictions.represent(
                flat, row * seq + left, row * seq + right, rel)
            sbo_loss = ops.linear_cross_entropy(
                sbo_hidden, embeddings, heads.pair_target_predictions.bias, label,
                backend=self.backend)
            if return_logits:
                sbo_logits = F.linear(sbo_hidden, embeddings, heads.pair_target_predictions.bias)
        if return_logits:
            prediction_logits = F.linear(heads.predictions.transform_rows(hidden), embeddings,
                                         heads.predictions.bias)
        losses = [l for l in (mlm_loss, sbo_loss) if l is not None]
        loss = sum(losses[1:], losses[0]) if losses else None
        return SpanBertPreTrainingOutput(loss=loss, mlm_loss=mlm_loss, sbo_loss=sbo_loss,
                                         prediction_logits=prediction_logits,
                                         sbo_logits=sbo_logits, hidden_states=out.hidden_states)


class SpanBertForQuestionAnswering(_SpanBertPreTrainedModel):
    """Extractive QA: a linear layer gives start/end logits over the tokens.

    Matches ``transformers.BertForQuestionAnswering`` (positions outside the sequence are
    ignored in the loss; loss = mean of start and end cross-entropy), except that padded
    positions get the lowest logit so they never take probability mass.
    """

    checkpoint_kind = "qa"

    def __init__(self, config: SpanBertConfig, backend: str = "auto",
                 layout: str = "auto") -> None:
        super().__init__(config, backend, layout)
        self.bert = SpanBertModel(config.replace(add_pooling_layer=False), backend,
                                  layout=layout)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self._init_weights()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        token_type_ids: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.Tensor] = None,
        start_positions: Optional[torch.Tensor] = None,
        end_positions: Optional[torch.Tensor] = None,
        output_hidden_states: bool = False,
        *,
        return_dict: Optional[bool] = None,
        output_attentions: bool = False,
        head_mask: Optional[torch.Tensor] = None,
    ) -> SpanBertQuestionAnsweringOutput:
        as_tuple = _check_transformers_options(return_dict, output_attentions, head_mask)
        out = self.bert(input_ids, attention_mask, token_type_ids, position_ids,
                        output_hidden_states=output_hidden_states)
        logits = self.qa_outputs(out.last_hidden_state)
        start_logits, end_logits = (t.squeeze(-1).contiguous() for t in logits.split(1, dim=-1))
        if attention_mask is not None:
            pad = attention_mask == 0
            lowest = torch.finfo(start_logits.dtype).min
            start_logits = start_logits.masked_fill(pad, lowest)
            end_logits = end_logits.masked_fill(pad, lowest)
        loss = None
        if start_positions is not None or end_positions is not None:
            if start_positions is None or end_positions is None:
                raise ValueError("start_positions and end_positions must be given together")
            seq = start_logits.shape[1]
            parts = []
            for name, positions, logit in (("start_positions", start_positions, start_logits),
                                           ("end_positions", end_positions, end_logits)):
                if not isinstance(positions, torch.Tensor) or positions.is_floating_point():
                    raise TypeError(f"{name} must be an integer tensor of shape (batch,)")
                if positions.dim() > 1:
                    positions = positions.squeeze(-1)
                if tuple(positions.shape) != (start_logits.shape[0],):
                    raise ValueError(f"{name} must have shape ({start_logits.shape[0]},), "
                                     f"got {tuple(positions.shape)}")
                if attention_mask is not None and checks.values_checkable():
                    # Padded logits are -inf-like here: an answer there would be an inf loss.
                    inside = (positions >= 0) & (positions < seq)
                    rows = torch.arange(positions.shape[0], device=positions.device)
                    on_padding = inside & (attention_mask[rows, positions.clamp(0, seq - 1)] == 0)
                    if bool(on_padding.any()):
                        k = int(on_padding.nonzero()[0, 0])
                        raise ValueError(f"{name}[{k}] = {int(positions[k])} is a padded position "
                                         f"(attention_mask 0); point unanswerable examples at "
                                         f"[CLS] (0) or outside [0, {seq}) to ignore them")
                # As transformers: positions outside [0, seq) are ignored.
                positions = positions.clamp(0, seq)
                parts.append(F.cross_entropy(logit.float(), positions, ignore_index=seq))
            loss = (parts[0] + parts[1]) / 2
        result = SpanBertQuestionAnsweringOutput(loss=loss, start_logits=start_logits,
                                                 end_logits=end_logits,
                                                 hidden_states=out.hidden_states)
        return result.to_tuple() if as_tuple else result
