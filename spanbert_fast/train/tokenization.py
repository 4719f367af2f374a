"""The WordPiece tokenizer of the training commands, on the ``tokenizers`` library.

SpanBERT uses BERT's cased WordPiece vocabulary: text is cleaned, punctuation and CJK
characters are split off, accents are kept and case is preserved; a word's pieces after
the first carry the ``##`` prefix. :class:`WordPieceTokenizer` builds that pipeline
around a BERT ``vocab.txt`` or trains a vocabulary on a corpus, and saves itself as
``tokenizer.json`` + ``vocab.txt`` + ``tokenizer_config.json`` beside a model, which
``transformers.AutoTokenizer`` and :func:`load_tokenizer` both read back.
"""

from __future__ import annotations

import json
import os
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch

from .input_files import InputError, read_json, read_utf8

__all__ = [
    "SPECIAL_TOKENS",
    "WordPieceTokenizer",
    "load_tokenizer",
    "train_tokenizer",
    "tokenizer_from_vocab_file",
    "config_lowercase",
]

# BERT's special tokens; every one must be in the vocabulary.
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = (PAD, UNK, CLS, SEP, MASK)
CONTINUATION_PREFIX = "##"
# BERT's limit: a longer "word" becomes [UNK] instead of hundreds of single-char pieces.
MAX_INPUT_CHARS_PER_WORD = 100

TOKENIZER_FILE = "tokenizer.json"
VOCAB_FILE = "vocab.txt"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


def _build_pipeline(vocab: Dict[str, int], lowercase: bool):
    """A ``tokenizers.Tokenizer`` with BERT's normalizer, pre-tokenizer and template."""
    from tokenizers import Tokenizer, decoders, models, processors

    tokenizer = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK,
                                           max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD))
    _set_bert_pipeline(tokenizer, lowercase)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}", pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, vocab[CLS]), (SEP, vocab[SEP])])
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
    return tokenizer


def _set_bert_pipeline(tokenizer, lowercase: bool) -> None:
    from tokenizers import normalizers, pre_tokenizers

    # strip_accents follows lowercase, as in BERT: the cased model keeps accents.
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=lowercase,
        lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()


class WordPieceTokenizer:
    """A BERT WordPiece ``tokenizers.Tokenizer`` plus what training needs from it.

    Attributes:
        backend: the ``tokenizers.Tokenizer``.
        lowercase: whether text is lowercased (and accents stripped); False for SpanBERT.
        pad_id, unk_id, cls_id, sep_id, mask_id: the special tokens' ids.
        vocab_size: one more than the largest id (ids of a ``vocab.txt`` are line numbers).
    """

    def __init__(self, backend, lowercase: bool, source: str) -> None:
        # The training commands pack, window and pad the token ids themselves. A
        # tokenizer.json that pads or truncates (sentence-transformers folders pad and cut
        # to 128) made [PAD] count as text (5x the corpus's tokens in the tests) and cut
        # every QA context, so both are off for whatever backend is wrapped here.
        backend.no_padding()
        backend.no_truncation()
        self.backend = backend
        self.lowercase = bool(lowercase)
        self.source = source
        self._vocab: Dict[str, int] = backend.get_vocab(with_added_tokens=True)
        missing = [tok for tok in SPECIAL_TOKENS if tok not in self._vocab]
        if missing:
            raise InputError(f"vocabulary {source!r} lacks the special token"
                             f"{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                             f"(BERT vocabularies need {' '.join(SPECIAL_TOKENS)})")
        if set(self._vocab) <= set(SPECIAL_TOKENS):
            # (Pretraining failed with "unigram must have a positive sum": no token to draw
            # the random replacements from.)
            raise InputError(f"vocabulary {source!r} holds only the special tokens "
                             f"{' '.join(SPECIAL_TOKENS)}; it needs word pieces to tokenize "
                             f"text")
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (
            self._vocab[tok] for tok in SPECIAL_TOKENS)
        self.vocab_size = max(self._vocab.values()) + 1

    # -- what the model and the sampler need -------------------------------------------
    @property
    def special_token_ids(self) -> List[int]:
        """Ids of the special tokens, which the span masker never masks."""
        return [self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id]

    def is_continuation(self) -> torch.Tensor:
        """``(vocab_size,)`` bool: True for the ``##`` pieces that continue a word."""
        flags = torch.zeros(self.vocab_size, dtype=torch.bool)
        for token, index in self._vocab.items():
            if token.startswith(CONTINUATION_PREFIX) and len(token) > len(CONTINUATION_PREFIX):
                flags[index] = True
        return flags

    def lowercased(self) -> "WordPieceTokenizer":
        """The same vocabulary behind BERT's uncased normalisation (lowercase, strip
        accents): what the tokenizer would give with ``--lowercase``."""
        return WordPieceTokenizer(_build_pipeline(self._vocab, True), True, self.source)

    def id_to_token(self, index: int) -> Optional[str]:
        return self.backend.id_to_token(index)

    def fingerprint(self) -> str:
        """A digest of the vocabulary and normalisation, to tell tokenizers apart."""
        import hashlib

        digest = hashlib.sha256(f"lowercase={self.lowercase}\n".encode())
        for token, index in sorted(self._vocab.items(), key=lambda item: item[1]):
            digest.update(f"{index}\t{token}\n".encode())
        return digest.hexdigest()[:16]

    # -- encoding -------------------------------------------------------------------------
    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of each text, without [CLS]/[SEP]."""
        return [enc.ids for enc in self.backend.encode_batch_fast(list(texts),
                                                                   add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        """Token ids of ``text`` (no specials) and each token's ``(start, end)`` character
        span in ``text``."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return list(encoding.ids), [tuple(span) for span in encoding.offsets]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode(list(ids))

    # -- saving ---------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Write ``tokenizer.json``, ``vocab.txt``, ``tokenizer_config.json`` and
        ``special_tokens_map.json`` into ``directory``: every file is written to a temporary
        file first and the four are renamed into place only once all were written."""
        from ..io import atomic_write_all

        os.makedirs(directory, exist_ok=True)
        by_id = {index: token for token, index in self._vocab.items()}
        # Ids without a token (duplicate lines of a vocab.txt) get a placeholder line so
        # that line numbers stay ids.
        vocab_text = "".join(f"{by_id.get(i, f'[unused_id_{i}]')}\n"
                             for i in range(self.vocab_size))
        config = {
            "tokenizer_class": "BertTokenizer", "do_lower_case": self.lowercase,
            "strip_accents": self.lowercase, "tokenize_chinese_chars": True,
            "model_max_length": 512, "pad_token": PAD, "unk_token": UNK, "cls_token": CLS,
            "sep_token": SEP, "mask_token": MASK,
        }
        special = {"pad_token": PAD, "unk_token": UNK, "cls_token": CLS, "sep_token": SEP,
                   "mask_token": MASK}

        def text_writer(text: str):
            def write(tmp: str) -> None:
                with open(tmp, "w", encoding="utf-8") as handle:
                    handle.write(text)
            return write

        # All four written in full before any is renamed over a previous save.
        atomic_write_all([
            (os.path.join(directory, TOKENIZER_FILE),
             lambda tmp: self.backend.save(tmp, pretty=False)),
            (os.path.join(directory, VOCAB_FILE), text_writer(vocab_text)),
            (os.path.join(directory, TOKENIZER_CONFIG_FILE),
             text_writer(json.dumps(config, indent=2, sort_keys=True) + "\n")),
            (os.path.join(directory, SPECIAL_TOKENS_MAP_FILE),
             text_writer(json.dumps(special, indent=2, sort_keys=True) + "\n")),
        ])


def _read_vocab_file(path: str) -> Dict[str, int]:
    """BERT's ``vocab.txt``: one token per line, its id is its line number (0-based)."""
    text = read_utf8(path, "vocab file")
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    vocab: Dict[str, int] = {}
    for index, line in enumerate(lines):
        token = line.rstrip("\r")
        if token:
            vocab[token] = index  # a duplicate line: the later id wins, as in BERT
    if not vocab:
        raise InputError(f"vocab file {path!r} is empty")
    return vocab


def tokenizer_from_vocab_file(path: str, lowercase: bool = False) -> WordPieceTokenizer:
    """The BERT WordPiece tokenizer of a ``vocab.txt`` (cased unless ``lowercase``)."""
    vocab = _read_vocab_file(path)
    missing = [tok for tok in SPECIAL_TOKENS if tok not in vocab]
    if missing:  # checked here too: the template below needs [CLS] and [SEP]
        raise InputError(f"vocab file {path!r} lacks the special token"
                         f"{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
                         f"(BERT vocabularies need {' '.join(SPECIAL_TOKENS)})")
    return WordPieceTokenizer(_build_pipeline(vocab, lowercase), lowercase, path)


def _tokenizer_from_json(path: str) -> WordPieceTokenizer:
    from tokenizers import Tokenizer

    values = read_json(path, "tokenizer file")
    model = values.get("model") if isinstance(values, dict) else None
    if not isinstance(model, dict) or model.get("type") != "WordPiece":
        kind = model.get("type") if isinstance(model, dict) else None
        raise InputError(f"tokenizer file {path!r} is not a WordPiece tokenizer "
                         f"(model type {kind!r}); SpanBERT needs BERT's WordPiece")
    if model.get("continuing_subword_prefix", CONTINUATION_PREFIX) != CONTINUATION_PREFIX:
        raise InputError(f"tokenizer file {path!r} marks word continuations with "
                         f"{model.get('continuing_subword_prefix')!r}, expected "
                         f"{CONTINUATION_PREFIX!r}")
    try:
        backend = Tokenizer.from_str(json.dumps(values))
    except Exception as err:  # the Rust side raises plain Exception
        raise InputError(f"tokenizer file {path!r} cannot be loaded: {err}") from None
    normalizer = values.get("normalizer") or {}
    lowercase = bool(normalizer.get("lowercase", False))
    return WordPieceTokenizer(backend, lowercase, path)


def config_lowercase(directory: str) -> Optional[bool]:
    """``do_lower_case`` from the ``tokenizer_config.json`` in ``directory`` (transformers
    writes one beside every ``vocab.txt``); None when there is none or it does not say."""
    config_path = os.path.join(directory, TOKENIZER_CONFIG_FILE)
    if not os.path.isfile(config_path):
        return None
    config = read_json(config_path, "tokenizer config")
    if not isinstance(config, dict) or "do_lower_case" not in config:
        return None
    return bool(config["do_lower_case"])


def load_tokenizer(path: str) -> WordPieceTokenizer:
    """A tokenizer from ``tokenizer.json``, a ``vocab.txt``, or a directory holding either
    (``tokenizer.json`` preferred; a ``vocab.txt``, named or found in the directory, is
    lowercased only when the ``tokenizer_config.json`` beside it says
    ``do_lower_case: true``)."""
    if os.path.isdir(path):
        json_path = os.path.join(path, TOKENIZER_FILE)
        if os.path.isfile(json_path):
            return _tokenizer_from_json(json_path)
        vocab_path = os.path.join(path, VOCAB_FILE)
        if os.path.isfile(vocab_path):
            return tokenizer_from_vocab_file(vocab_path,
                                             lowercase=bool(config_lowercase(path)))
        raise InputError(f"directory {path!r} holds no {TOKENIZER_FILE} or {VOCAB_FILE}")
    if not os.path.exists(path):
        raise InputError(f"tokenizer {path!r} does not exist")
    if path.endswith(".json"):
        return _tokenizer_from_json(path)
    # A vocab.txt named directly follows the tokenizer_config.json beside it too (an
    # uncased vocabulary read cased turns ~5% of English tokens into [UNK]).
    return tokenizer_from_vocab_file(
        path, lowercase=bool(config_lowercase(os.path.dirname(os.path.abspath(path)))))


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, lowercase: bool = False,
                    min_frequency: int = 2) -> WordPieceTokenizer:
    """Train a WordPiece vocabulary of at most ``vocab_size`` tokens (special tokens
    included) on ``texts``, with BERT's normalisation (cased unless ``lowercase``).

    The trainer stops early when the corpus has fewer distinct pieces; the result's
    ``vocab_size`` says how many it found.
    """
    from tokenizers import Tokenizer, models, trainers

    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise InputError(f"--train-tokenizer needs a vocabulary size above "
                         f"{len(SPECIAL_TOKENS)}, got {vocab_size}")
    backend = Tokenizer(models.WordPiece(unk_token=UNK,
                                         max_input_chars_per_word=MAX_INPUT_CHARS_PER_WORD))
    _set_bert_pipeline(backend, lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        continuing_subword_prefix=CONTINUATION_PREFIX, show_progress=False)
    backend.train_from_iterator(_non_empty(texts), trainer=trainer)
    # Rebuild from the learned vocabulary so the result has the same pipeline (template,
    # decoder) as a tokenizer read from a vocab.txt.
    vocab = backend.get_vocab()
    return WordPieceTokenizer(_build_pipeline(vocab, lowercase), lowercase,
                              "trained on the corpus")


def _non_empty(texts: Iterable[str]) -> Iterator[str]:
    for text in texts:
        if text.strip():
            yield text
