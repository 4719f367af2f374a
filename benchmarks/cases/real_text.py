"""Real English text, tokenized with a WordPiece vocabulary: the length distribution of the
real-length cases.

Synthetic uniform lengths flatter neither layout honestly: real batches of sentences are
mostly padding (a few long sentences set the padded width). The text here is the prose of
the Python documentation's language reference, which every CPython ships as
``pydoc_data.topics`` (~465 KB): about 770 paragraphs and 1,600 sentences of technical
English once code listings and headings are dropped. It is tokenized, cased as SpanBERT
is, with the WordPiece vocabulary ``benchmarks/data/pydoc-wordpiece.txt``: 3,270 pieces
(8,000 asked for; the trainer keeps only pieces seen at least twice) trained on those
paragraphs by :func:`spanbert_fast.train.tokenization.train_tokenizer`, and committed, since the
trainer breaks ties differently from run to run (``python -m benchmarks.cases.real_text
--write-vocab`` rebuilds it). A real BERT vocabulary of 28,996 pieces splits rare words
less, so its sentences would be a little shorter.

Measured with that vocabulary: sentences are 28.8 tokens on average with [CLS] and [SEP]
(median 25, longest 333); a batch of 16 random sentences is 45% real tokens when padded to
its longest row, a batch of 64 is 36%; paragraphs average 56 tokens.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
from typing import List, Optional, Tuple

import torch

__all__ = [
    "VOCAB_PATH",
    "unavailable_reason",
    "paragraphs",
    "sentences",
    "tokenizer",
    "sentence_batch",
    "qa_windows",
]

VOCAB_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "data", "pydoc-wordpiece.txt")
VOCAB_SIZE = 8000
# BERT's [CLS] ... [SEP] around a sentence; [CLS] q [SEP] context [SEP] for QA.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"(])")


def unavailable_reason() -> Optional[str]:
    """None when the text and the vocabulary are here, else why not (the case is skipped)."""
    try:
        import pydoc_data.topics  # noqa: F401
    except ImportError as err:  # some distributions split the stdlib's data off
        return f"the Python docs text (pydoc_data.topics) is not installed: {err}"
    if not os.path.exists(VOCAB_PATH):
        return f"the WordPiece vocabulary {VOCAB_PATH} is missing"
    return None


@functools.lru_cache(maxsize=1)
def paragraphs() -> Tuple[str, ...]:
    """The prose paragraphs of ``pydoc_data.topics``, in topic order: blocks of lines
    with no indented line (indented lines are code, grammar or tables), starting with a
    capital letter, of at least 8 words; each joined into one line."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        for block in re.split(r"\n\s*\n", topics[key]):
            lines = block.split("\n")
            if any(line[:1] in (" ", "\t") for line in lines):
                continue
            text = " ".join(line.strip() for line in lines).strip()
            if len(text.split()) >= 8 and re.match(r"[A-Z]", text):
                out.append(text)
    return tuple(out)


@functools.lru_cache(maxsize=1)
def sentences() -> Tuple[str, ...]:
    """The paragraphs split into sentences of at least 4 words."""
    return tuple(s for p in paragraphs() for s in _SENTENCE_END.split(p) if len(s.split()) >= 4)


@functools.lru_cache(maxsize=1)
def tokenizer():
    from spanbert_fast.train.tokenization import tokenizer_from_vocab_file

    return tokenizer_from_vocab_file(VOCAB_PATH)


def _pad(rows: List[List[int]], types: Optional[List[List[int]]], width: int):
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    token_types = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        if types is not None:
            token_types[i, :len(row)] = torch.tensor(types[i])
    return ids, mask, token_types


def sentence_batch(batch: int, gen: torch.Generator, max_len: int = 512):
    """``batch`` sentences drawn without replacement, ``[CLS] s [SEP]`` (cut at
    ``max_len``), padded to the longest row as a tokenizer's ``padding=True`` would.
    Returns ``(input_ids, attention_mask)``, both ``(batch, longest)`` int64."""
    pool = sentences()
    picks = torch.randperm(len(pool), generator=gen)[:batch].tolist()
    tok = tokenizer()
    cls, sep = tok.cls_id, tok.sep_id
    rows = [[cls] + ids[:max_len - 2] + [sep]
            for ids in tok.encode_batch([pool[i] for i in picks])]
    ids, mask, _ = _pad(rows, None, max(len(r) for r in rows))
    return ids, mask


def qa_windows(batch: int, gen: torch.Generator, seq: int = 384):
    """``batch`` SQuAD-style windows ``[CLS] question [SEP] context [SEP]`` padded to
    ``seq`` (as run_squad pads every window to max_seq_length): the context is a real
    paragraph (cut to fit), the question a sentence of another paragraph (at most 64
    tokens, run_squad's max_query_length). Returns ``(input_ids, attention_mask,
    token_type_ids)``, each ``(batch, seq)`` int64."""
    paras, pool = paragraphs(), sentences()
    contexts = torch.randperm(len(paras), generator=gen)[:batch].tolist()
    questions = torch.randperm(len(pool), generator=gen)[:batch].tolist()
    tok = tokenizer()
    cls, sep = tok.cls_id, tok.sep_id
    rows, types = [], []
    for question, context in zip(tok.encode_batch([pool[i] for i in questions]),
                                 tok.encode_batch([paras[i] for i in contexts])):
        question = question[:64]
        context = context[:seq - len(question) - 3]
        rows.append([cls] + question + [sep] + context + [sep])
        types.append([0] * (len(question) + 2) + [1] * (len(context) + 1))
    return _pad(rows, types, seq)


def _write_vocab() -> None:
    from spanbert_fast.train.tokenization import train_tokenizer

    tok = train_tokenizer(paragraphs(), VOCAB_SIZE)
    vocab = sorted(tok.backend.get_vocab().items(), key=lambda item: item[1])
    tmp = VOCAB_PATH + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write("".join(f"{token}\n" for token, _ in vocab))
    os.replace(tmp, VOCAB_PATH)
    print(f"wrote {len(vocab)} pieces to {VOCAB_PATH}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write-vocab", action="store_true",
                        help=f"train and write {VOCAB_PATH}")
    if parser.parse_args().write_vocab:
        _write_vocab()
