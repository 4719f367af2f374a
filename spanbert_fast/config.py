"""SpanBertConfig: the model's hyper-parameters, read from and written to the
``config.json`` that ``transformers.BertConfig`` uses, so a checkpoint directory works
with both libraries."""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

# transformers' BERT keys we understand; anything else in a config.json is kept in
# ``extra`` and written back unchanged, so a round trip loses nothing (a key that looks
# like a misspelt field is refused instead, and another unknown key warned about).
_BERT_KEYS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "intermediate_size", "hidden_act", "hidden_dropout_prob",
    "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "pad_token_id",
)
# Keys that are ours; stored in config.json under these names (transformers ignores them).
_SPANBERT_KEYS = ("add_pooling_layer", "sbo_max_targets", "sbo_position_embedding_size")
# Keys that are not ours but that a BERT config.json may rightly hold: what transformers
# (4.x and 5.x) writes or accepts for every model, and what Google's original BERT configs
# carry. They are kept in ``extra`` and written back unchanged. Any other key is warned
# about, or refused when it looks like a typo of a field ("hiden_size"), which would be
# silently ignored while a 768-wide model is built; keys starting with "_" are
# transformers' private bookkeeping (_name_or_path, ...).
_TRANSFORMERS_KEYS = frozenset((
    # the file and the model around the encoder
    "architectures", "transformers_version", "dtype", "torch_dtype", "use_bfloat16",
    "finetuning_task", "id2label", "label2id", "num_labels", "problem_type",
    "tokenizer_class", "prefix", "task_specific_params", "classifier_dropout",
    "position_embedding_type", "torchscript", "xla_device", "tf_legacy_loss",
    "gradient_checkpointing", "output_past",
    # outputs and structure (PretrainedConfig)
    "return_dict", "output_hidden_states", "output_attentions", "pruned_heads",
    "tie_word_embeddings", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "add_cross_attention", "cross_attention_hidden_size", "tie_encoder_decoder", "use_cache",
    "bos_token_id", "eos_token_id", "sep_token_id", "decoder_start_token_id",
    # generation defaults that transformers 4.x kept in every config
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
    # Google's original BERT release (bert_config.json)
    "directionality", "pooler_fc_size", "pooler_num_attention_heads", "pooler_num_fc_layers",
    "pooler_size_per_head", "pooler_type",
))
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
    def from_dict(cls, values: Dict[str, Any], *, strict: bool = True) -> "SpanBertConfig":
        """Build the config from a transformers/SpanBERT ``config.json`` dict.

        ``strict`` (default): a key that is neither a field of this class nor one that
        transformers or the original BERT release writes (see ``_TRANSFORMERS_KEYS``)
        raises a ValueError naming it and the closest field, since it is most likely a
        typo that would otherwise be ignored. ``strict=False`` keeps such keys in
        ``extra`` (for a transformers config object, which has already accepted them).
        """
        if not isinstance(values, dict):
            raise TypeError(f"config must be a dict of BERT config keys, got {type(values).__name__}")
        model_type = values.get("model_type", "bert")
        if model_type not in ("bert", "spanbert"):
            raise ValueError(f"config model_type must be 'bert', got {model_type!r}")
        if strict:
            _check_keys(values)
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


def _check_keys(values: Dict[str, Any]) -> None:
    """Refuse a key that nothing reads and that looks like a misspelt field ("hiden_size":
    a 768-wide model would be built while the file asks for another width), suggesting the
    field; warn about (and keep, in ``extra``) any other key nothing reads, as transformers
    keeps a custom key, so a model saved with one still loads (see ``_TRANSFORMERS_KEYS``)."""
    fields = _BERT_KEYS + _SPANBERT_KEYS
    unknown = [k for k in values
               if not (k in fields or k in _TRANSFORMERS_KEYS or k == "model_type"
                       or (isinstance(k, str) and k.startswith("_")))]
    if not unknown:
        return
    typos, others = [], []
    for key in unknown:
        close = difflib.get_close_matches(str(key), fields, n=1, cutoff=_TYPO_CUTOFF)
        if close:
            typos.append(f"{key!r} (did you mean {close[0]!r}?)")
        else:
            others.append(repr(key))
    if typos:
        raise ValueError(
            f"unknown config key{'s' if len(typos) > 1 else ''} {', '.join(typos)}: neither "
            f"a SpanBertConfig field nor a key transformers writes, so it would be ignored. "
            f"The fields are: {', '.join(fields)}")
    warnings.warn(f"config key{'s' if len(others) > 1 else ''} {', '.join(others)} "
                  f"{'are' if len(others) > 1 else 'is'} not read by spanbert_fast (kept and "
                  f"written back unchanged)", stacklevel=4)


# How close (difflib ratio) an unknown key must be to a field to be refused as its typo:
# "hiden_size" vs "hidden_size" is 0.95, "layer_norm_epsilon" vs "layer_norm_eps" 0.88;
# a custom key such as "custom_flag" is at most 0.5 from any field.
_TYPO_CUTOFF = 0.8
