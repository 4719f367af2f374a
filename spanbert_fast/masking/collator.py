"""``SpanMaskingCollator``: batches tokenized examples for a DataLoader and masks them."""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .parameters import (INT64_RANGE, check_int)
from .sampler import SpanMasker

class SpanMaskingCollator:
    """``collate_fn`` for a ``torch.utils.data.DataLoader`` of tokenized examples.

    Each example is a sequence of ids (list, tuple, 1-D tensor or array) or a mapping (a
    dict, transformers' ``BatchEncoding``, ...) with ``"input_ids"``, optionally
    ``"attention_mask"`` (positions where it is 0 are padding and are dropped before the
    batch is re-padded) and ``"index"`` (the example's index in the dataset). Returns the
    right-padded batch as a dict of int64 tensors on ``masker.device``: ``input_ids``
    (batch, seq) masked, ``attention_mask`` (batch, seq) 1/0, ``labels`` (batch, seq) and
    ``sbo_targets`` (N, 5) (see :class:`SpanMasker`).

    Offsets (each sequence's random stream): an example's ``"index"`` when present, else
    the masker's running counter. With ``num_workers > 0`` every worker holds its own copy
    of the counter, so give examples an ``"index"`` there (and change the masker's seed per
    epoch for fresh masks).

    Args:
        masker: the :class:`SpanMasker`.
        pad_token_id: id written into padding (never masked: it is outside the attention mask).
        pad_to_multiple_of: round the padded width up to a multiple of this.
    """

    def __init__(self, masker: SpanMasker, pad_token_id: int = 0,
                 pad_to_multiple_of: Optional[int] = None) -> None:
        if not isinstance(masker, SpanMasker):
            raise TypeError(f"masker must be a SpanMasker, got {type(masker).__name__}")
        self.masker = masker
        self.pad_token_id = check_int("pad_token_id", pad_token_id, 0, masker.vocab_size - 1)
        self.pad_to_multiple_of = (None if pad_to_multiple_of is None else
                                   check_int("pad_to_multiple_of", pad_to_multiple_of, 1))

    def state_dict(self) -> Dict[str, int]:
        return self.masker.state_dict()

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self.masker.load_state_dict(state)

    def __call__(self, examples: Sequence[Any]) -> Dict[str, torch.Tensor]:
        if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
            raise TypeError(f"examples must be a list of examples, got {type(examples).__name__}")
        sequences: List[List[int]] = []
        indices: List[Optional[int]] = []
        for k, example in enumerate(examples):
            index = None
            keep = None
            if isinstance(example, Mapping):
                if "input_ids" not in example:
                    raise ValueError(f"examples[{k}] is a {type(example).__name__} without "
                                     "'input_ids'")
                index = example.get("index")
                if index is not None:
                    index = check_int(f"examples[{k}]['index']", _as_int(index), *INT64_RANGE)
                if example.get("attention_mask") is not None:
                    keep = _as_id_list(f"examples[{k}]['attention_mask']",
                                       example["attention_mask"])
                example = example["input_ids"]
            ids = _as_id_list(f"examples[{k}]", example)
            if keep is not None:
                if len(keep) != len(ids):
                    raise ValueError(f"examples[{k}]['attention_mask'] has {len(keep)} entries "
                                     f"but its 'input_ids' has {len(ids)}")
                # A tokenizer that padded the example: its padding is not text to mask.
                ids = [i for i, real in zip(ids, keep) if real]
            sequences.append(ids)
            indices.append(index)
        width = max((len(s) for s in sequences), default=0)
        if self.pad_to_multiple_of is not None:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.int64)
        for row, ids in enumerate(sequences):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
            attention_mask[row, :len(ids)] = 1
        # Examples without an index take the counter's next values; it advances only once
        # the batch is masked, so a batch that raised can be retried with the same masks.
        counter = iter(range(self.masker.sequences_seen, self.masker.sequences_seen
                             + sum(i is None for i in indices)))
        offsets = [next(counter) if i is None else i for i in indices]
        device = self.masker.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        out = self.masker(input_ids, attention_mask, offsets=offsets)
        self.masker.sequences_seen += sum(i is None for i in indices)
        return {"input_ids": out.input_ids, "attention_mask": attention_mask,
                "labels": out.labels, "sbo_targets": out.sbo_targets}


def _as_int(value: Any) -> Any:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return int(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def _as_id_list(name: str, example: Any) -> List[int]:
    if isinstance(example, torch.Tensor):
        if example.dim() != 1 or example.dtype.is_floating_point or example.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor of ids, got {example.dtype} of "
                             f"shape {tuple(example.shape)}")
        return example.tolist()
    if isinstance(example, np.ndarray):
        if example.ndim != 1 or not np.issubdtype(example.dtype, np.integer):
            raise ValueError(f"{name} must be a 1-D integer array of ids, got {example.dtype} of "
                             f"shape {example.shape}")
        return example.tolist()
    if isinstance(example, (str, bytes)) or not isinstance(example, Sequence):
        raise TypeError(f"{name} must be a sequence of ids or a mapping (dict, BatchEncoding) "
                        f"with 'input_ids', got {type(example).__name__}")
    for position, value in enumerate(example):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name}[{position}] must be an int id, got {type(value).__name__}")
    return [int(v) for v in example]
