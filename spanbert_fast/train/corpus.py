"""Plain-text corpus -> packed single-segment blocks, and the order they are trained in.

Corpus format (BERT's): UTF-8 text, one sentence (or paragraph) per line, documents
separated by blank lines; every file ends a document. A directory is read recursively,
files in sorted path order.

Packing follows SpanBERT's single-segment ``BlockDataset`` (``break_mode="doc"``): whole
lines are appended to a block while they fit in ``seq_len - 2`` tokens; a block never
crosses a document boundary. A line longer than a block is dropped, as the original does
(it also ends the block being filled, as it does there), and counted in
:attr:`PackedBlocks.dropped_lines`; ``long_lines="cut"`` cuts it into block-sized pieces
instead. (The original also loses the block being filled when a document's *last* line
is too long; we keep that block.)
Each block is trained as ``[CLS] block [SEP]``; the last block of a document may be
shorter (batches are padded to their longest row).

Order: the blocks of epoch ``e`` are visited in a permutation drawn from
``(seed, e)``; the ``g``-th block visited over the whole run (its *global index*) is
``permutation_{g // N}[g % N]``. A global index names a block and its place in the run,
independently of how many processes share the work, which is why the span masker is
keyed by it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence

import numpy as np

from .input_files import InputError, list_corpus_files, read_utf8

__all__ = ["CorpusText", "read_corpus", "PackedBlocks", "pack_corpus", "BlockOrder"]


@dataclass
class CorpusText:
    """The corpus as documents of non-empty lines."""

    files: List[str]
    documents: List[List[str]]

    def lines(self) -> Iterator[str]:
        for document in self.documents:
            yield from document


def read_corpus(path: str) -> CorpusText:
    """Read every corpus file under ``path``. Raises :class:`InputError` for a missing
    path, a file that is not UTF-8, or a corpus without any text (an empty single file is
    reported as such; empty files inside a directory are skipped)."""
    files = list_corpus_files(path)
    documents: List[List[str]] = []
    for file in files:
        text = read_utf8(file, "corpus file")
        if not text.strip():
            if len(files) == 1:
                raise InputError(f"corpus file {file!r} is empty")
            continue
        current: List[str] = []
        # Newlines only: str.splitlines() also splits at form feeds, \x1c-\x1e, \x85,
        # U+2028 and U+2029, which would turn one line into several (or into a document
        # boundary).
        for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
            line = line.strip()
            if line:
                current.append(line)
            elif current:
                documents.append(current)
                current = []
        if current:
            documents.append(current)
    if not documents:
        raise InputError(f"corpus {path!r} holds no text (all {len(files)} files are empty)")
    return CorpusText(files, documents)


@dataclass
class PackedBlocks:
    """Blocks of token ids without [CLS]/[SEP]: block ``b`` is
    ``tokens[offsets[b]:offsets[b + 1]]``."""

    tokens: np.ndarray   # (total,) int32
    offsets: np.ndarray  # (num_blocks + 1,) int64
    # Lines longer than a block that were dropped (long_lines="drop"), and their tokens.
    dropped_lines: int = 0
    dropped_tokens: int = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def block(self, index: int) -> List[int]:
        return self.tokens[self.offsets[index]:self.offsets[index + 1]].tolist()

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def token_counts(self, vocab_size: int) -> np.ndarray:
        """(vocab_size,) int64: how often each id occurs in the blocks (the corpus unigram
        the original SpanBERT draws its random replacement tokens from)."""
        return np.bincount(self.tokens, minlength=vocab_size).astype(np.int64)

    def fingerprint(self) -> str:
        """A digest of the blocks: tells whether a resumed run sees the same data."""
        digest = hashlib.sha256(self.offsets.astype("<i8").tobytes())
        digest.update(self.tokens.astype("<i4").tobytes())
        return digest.hexdigest()[:16]


def pack_corpus(corpus: CorpusText, tokenizer, block_len: int,
                long_lines: str = "drop") -> PackedBlocks:
    """Tokenize ``corpus`` with ``tokenizer`` (a ``WordPieceTokenizer``) and pack it into
    blocks of at most ``block_len`` tokens (see the module docstring). ``long_lines``:
    ``"drop"`` (the original) or ``"cut"`` a line longer than a block."""
    if block_len < 1:
        raise InputError(f"blocks must hold at least one token, got block length {block_len}")
    if long_lines not in ("drop", "cut"):
        raise ValueError(f"long_lines must be 'drop' or 'cut', got {long_lines!r}")
    dropped_lines = dropped_tokens = 0
    tokens: List[np.ndarray] = []
    lengths: List[int] = []

    def emit(pieces: Sequence[np.ndarray]) -> None:
        size = sum(len(p) for p in pieces)
        if size:
            tokens.extend(pieces)
            lengths.append(size)

    for document in corpus.documents:
        current: List[np.ndarray] = []
        current_len = 0
        for ids in tokenizer.encode_batch(document):
            line = np.asarray(ids, dtype=np.int32)
            if len(line) == 0:
                continue
            if current_len + len(line) > block_len and current:
                emit(current)
                current, current_len = [], 0
            if len(line) > block_len and long_lines == "drop":
                dropped_lines += 1
                dropped_tokens += len(line)
                continue
            while len(line) > block_len:  # a line longer than a block: cut it
                emit([line[:block_len]])
                line = line[block_len:]
            current.append(line)
            current_len += len(line)
        emit(current)
    if not lengths:
        if dropped_lines:
            raise InputError(f"every line of the corpus is longer than a block of {block_len} "
                             f"tokens ({dropped_lines} dropped); use a longer --seq-len or "
                             f"--long-sentences cut")
        raise InputError("the corpus yields no tokens with this vocabulary")
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return PackedBlocks(np.concatenate(tokens).astype(np.int32, copy=False), offsets,
                        dropped_lines=dropped_lines, dropped_tokens=dropped_tokens)


class BlockOrder:
    """Global index -> block: a fresh permutation of the blocks each epoch, drawn from
    ``(seed, epoch)`` (so any process computes any epoch's order on its own)."""

    def __init__(self, num_blocks: int, seed: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be positive, got {num_blocks}")
        self.num_blocks = num_blocks
        self.seed = seed
        self._permutations: Dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            if len(self._permutations) > 2:  # only neighbouring epochs are ever needed
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations[epoch] = rng.permutation(self.num_blocks)
        return self._permutations[epoch]

    def block_at(self, global_index: int) -> int:
        epoch, position = divmod(global_index, self.num_blocks)
        return int(self.permutation(epoch)[position])
