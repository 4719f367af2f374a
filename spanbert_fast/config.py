"""SpanBertConfig: the model's hyper-parameters, read from and written to the
``config.json`` that ``transformers.BertConfig`` uses, so a checkpoint directory works
with both libraries."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

# transformers' BERT keys we understand; anything else in a config.json is kept in
# ``extra`` and written back unchanged, so a round trip loses nothing.
_BERT_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "hidden_act", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "pad_token_id",
)
# Keys that are ours; stored in config.json under these names (transformers ignores them).
_SPANBERT_KEYS = ("add_pooling_layer", "sbo_max_targets", "sbo_position_embedding_size")
_SUPPORTED_ACTS = ("gelu",)


@dataclass
class SpanBertConfig:
    """Hyper-parameters of a SpanBERT (BERT-architecture) encoder and its heads.

    The defaults are SpanBERT-base as released by Joshi et al. (2020).
    """

    # Cased WordPiece vocabulary of the SpanBERT release (same as bert-base-cased).
    vocab_size: int = 28996
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    # SpanBERT and BERT use the exact erf GELU; the tanh approximation would change outputs.
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    # BERT's TF-style LayerNorm epsilon; 1e-5 (torch's default) gives visibly different outputs.
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    # SpanBERT drops next-sentence prediction, so the released checkpoints have no pooler.
    add_pooling_layer: bool = False
    # Rows of the SBO relative-position table: the longest span (in tokens) that yields
    # SBO targets. The release uses 15 (its pretraining config); fairseq's default is 20.
    sbo_max_targets: int = 15
    # Width of the SBO relative-position embedding (200 in the release).
    sbo_position_embedding_size: int = 200
    # Unknown keys from a config.json, written back as they came.
    extra: Dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        positive = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings", "type_vocab_size",
                    "sbo_max_targets", "sbo_position_embedding_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"SpanBertConfig.{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"SpanBertConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in _SUPPORTED_ACTS:
            raise ValueError(
                f"SpanBertConfig.hidden_act must be one of {_SUPPORTED_ACTS} (exact erf GELU, "
                f"as BERT and SpanBERT use), got {self.hidden_act!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            value = getattr(self, name)
            if not (0.0 <= float(value) < 1.0):
                raise ValueError(f"SpanBertConfig.{name} must be in [0, 1), got {value!r}")
        if not (float(self.layer_norm_eps) > 0.0):
            raise ValueError(f"SpanBertConfig.layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        position_type = self.extra.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(
                "SpanBertConfig supports only absolute position embeddings (as BERT and "
                f"SpanBERT use); the config asks for position_embedding_type={position_type!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # -- presets -------------------------------------------------------------------
    @classmethod
    def base(cls, **overrides: Any) -> "SpanBertConfig":
        """SpanBERT-base: 12 layers, hidden 768, 12 heads, cased vocab 28996."""
        return cls(**overrides)

    @classmethod
    def large(cls, **overrides: Any) -> "SpanBertConfig":
        """SpanBERT-large: 24 layers, hidden 1024, 16 heads, cased vocab 28996."""
        values = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                      intermediate_size=4096)
        values.update(overrides)
        return cls(**values)

    @classmethod
    def tiny(cls, **overrides: Any) -> "SpanBertConfig":
        """A 2-layer, 64-wide model for tests and smoke runs (not a released size)."""
        values = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=128, max_position_embeddings=128)
        values.update(overrides)
        return cls(**values)

    # -- transformers' config.json ---------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        """The config as transformers' BERT ``config.json`` dict (plus our own keys)."""
        out: Dict[str, Any] = dict(self.extra)
        out.update({"model_type": "bert", "position_embedding_type": "absolute"})
        for name in _BERT_KEYS + _SPANBERT_KEYS:
            out[name] = getattr(self, name)
        return out

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "SpanBertConfig":
        if not isinstance(values, dict):
            raise TypeError(f"config must be a dict of BERT config keys, got {type(values).__name__}")
        model_type = values.get("model_type", "bert")
        if model_type not in ("bert", "spanbert"):
            raise ValueError(f"config model_type must be 'bert', got {model_type!r}")
        known = {k: values[k] for k in _BERT_KEYS + _SPANBERT_KEYS if k in values}
        extra = {k: v for k, v in values.items()
                 if k not in _BERT_KEYS and k not in _SPANBERT_KEYS and k != "model_type"}
        if extra.get("position_embedding_type") == "absolute":
            del extra["position_embedding_type"]  # the only kind we run; written back by to_dict
        return cls(**known, extra=extra)

    def to_json(self, path: Optional[str] = None) -> str:
        """Return the JSON text; when ``path`` is given also write it there atomically."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"
        if path is not None:
            path = os.fspath(path)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            tmp = f"{path}.tmp.{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, path)
        return text

    @classmethod
    def from_json(cls, path_or_text: str) -> "SpanBertConfig":
        """Read a transformers/SpanBERT ``config.json`` (a file, a directory holding one,
        or the JSON text itself)."""
        source = os.fspath(path_or_text)
        if source.lstrip().startswith("{"):
            text, where = source, "<text>"
        else:
            where = os.path.join(source, "config.json") if os.path.isdir(source) else source
            if not os.path.exists(where):
                raise FileNotFoundError(f"no config file at {where!r}")
            with open(where, "r", encoding="utf-8") as handle:
                text = handle.read()
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"config at {where} is not valid JSON: {err}") from None
        return cls.from_dict(values)

    def replace(self, **changes: Any) -> "SpanBertConfig":
        return dataclasses.replace(self, **changes)
