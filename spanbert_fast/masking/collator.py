"""``SpanMaskingCollator``: batches tokenized examples for a DataLoader and masks them."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from ..padding import unpad_lengths
from .parameters import INT64_RANGE, check_int, mask_ratio_fraction, masking_budget
from .sampler import SpanMasker

__all__ = ["SpanMaskingCollator", "StaticShapes"]


@dataclass(frozen=True)
class StaticShapes:
    """Fixed shapes for every batch, so that a step can be captured once by CUDA graphs
    (``torch.compile(mode="reduce-overhead")``).

    ``batch_size`` rows (a short last batch gets empty rows) of ``max_length`` positions;
    the packed tokens rounded up to a multiple of ``tokens_multiple_of`` (None: always
    ``batch_size * max_length``) by filler tokens, which form sequences of their own that
    attention never mixes with real ones; ``mlm_positions`` and ``sbo_targets`` padded to
    ``batch_size`` x the masker's per-row budget (``ceil(mask_ratio * max_length)``) with
    fillers ignored by the loss (position ``batch * seq``, label -100). The loss equals the
    unpadded batch's.
    """

    batch_size: int
    max_length: int
    tokens_multiple_of: Optional[int] = None

    def __post_init__(self) -> None:
        check_int("static_shapes.batch_size", self.batch_size, 1)
        check_int("static_shapes.max_length", self.max_length, 1)
        if self.tokens_multiple_of is not None:
            check_int("static_shapes.tokens_multiple_of", self.tokens_multiple_of, 1)

    @property
    def filler_sequences(self) -> int:
        """Sequences of at most ``max_length`` filler tokens that every batch carries."""
        most = (self.tokens_multiple_of - 1 if self.tokens_multiple_of is not None
                else self.batch_size * self.max_length)
        return math.ceil(most / self.max_length)

    def total_tokens(self, real: int) -> int:
        if self.tokens_multiple_of is None:
            return self.batch_size * self.max_length
        return -(-real // self.tokens_multiple_of) * self.tokens_multiple_of


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

    Packed (``packed=True``): the batch also holds what the models need to run padding-free
    without reading the device, computed on the host: ``"unpadded"`` (a
    :class:`spanbert_fast.padding.Unpadded`: ``cu_seqlens`` (batch + 1,) int32, flat
    ``indices`` of the real tokens, ``max_seqlen`` and ``total_tokens`` as Python ints) and
    ``"mlm_positions"`` (M,) int64, the flat positions of the masked tokens. Pass the batch
    as ``model(**batch)``; with ``model.check_values = False`` a pretraining step then
    makes no host synchronisation. Move it with ``{k: v.to(device) for k, v in
    batch.items()}`` (``Unpadded`` has ``.to``).

    Args:
        masker: the :class:`SpanMasker`.
        pad_token_id: id written into padding (never masked: it is outside the attention mask).
        pad_to_multiple_of: round the padded width up to a multiple of this.
        packed: add ``"unpadded"`` and ``"mlm_positions"``.
        static_shapes: a :class:`StaticShapes`: every batch gets the same shapes (implies
            ``packed``; excludes ``pad_to_multiple_of``).
    """

    def __init__(self, masker: SpanMasker, pad_token_id: int = 0,
                 pad_to_multiple_of: Optional[int] = None, *, packed: bool = False,
                 static_shapes: Optional[StaticShapes] = None) -> None:
        if not isinstance(masker, SpanMasker):
            raise TypeError(f"masker must be a SpanMasker, got {type(masker).__name__}")
        self.masker = masker
        self.pad_token_id = check_int("pad_token_id", pad_token_id, 0, masker.vocab_size - 1)
        self.pad_to_multiple_of = (None if pad_to_multiple_of is None else
                                   check_int("pad_to_multiple_of", pad_to_multiple_of, 1))
        if not isinstance(packed, bool):
            raise TypeError(f"packed must be a bool, got {type(packed).__name__}")
        if static_shapes is not None:
            if not isinstance(static_shapes, StaticShapes):
                raise TypeError(f"static_shapes must be a StaticShapes, got "
                                f"{type(static_shapes).__name__}")
            if pad_to_multiple_of is not None:
                raise ValueError("pad_to_multiple_of cannot be combined with static_shapes "
                                 "(its max_length is the padded width)")
        self.static_shapes = static_shapes
        self.packed = packed or static_shapes is not None

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
        rows = len(sequences)
        static = self.static_shapes
        if static is not None:
            if rows > static.batch_size:
                raise ValueError(f"examples holds {rows} examples, more than "
                                 f"static_shapes.batch_size={static.batch_size}")
            if width > static.max_length:
                raise ValueError(f"an example has {width} tokens, more than "
                                 f"static_shapes.max_length={static.max_length}")
            width, rows = static.max_length, static.batch_size
        input_ids = torch.full((rows, width), self.pad_token_id, dtype=torch.int64)
        attention_mask = torch.zeros((rows, width), dtype=torch.int64)
        for row, ids in enumerate(sequences):
            input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.int64)
            attention_mask[row, :len(ids)] = 1
        # Examples without an index take the counter's next values; it advances only once
        # the batch is masked, so a batch that raised can be retried with the same masks.
        counter = iter(range(self.masker.sequences_seen, self.masker.sequences_seen
                             + sum(i is None for i in indices)))
        offsets = [next(counter) if i is None else i for i in indices]
        # Empty rows of a short static batch: offsets past the counter's (they mask nothing).
        offsets += [0] * (rows - len(offsets))
        device = self.masker.device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        out = self.masker(input_ids, attention_mask, offsets=offsets)
        batch = {"input_ids": out.input_ids, "attention_mask": attention_mask,
                 "labels": out.labels, "sbo_targets": out.sbo_targets}
        if self.packed:
            batch.update(self._packed(sequences, rows, width, out))
        self.masker.sequences_seen += sum(i is None for i in indices)
        return batch

    def _packed(self, sequences: List[List[int]], rows: int, width: int,
                out) -> Dict[str, Any]:
        """The packed layout and the masked positions, from the host's row lengths (and,
        on a CUDA masker, one read of the labels, here rather than in the step)."""
        lengths = [len(s) for s in sequences] + [0] * (rows - len(sequences))
        device = self.masker.device
        static = self.static_shapes
        mlm_positions = (out.labels.reshape(-1) != -100).nonzero().squeeze(1)
        sbo_targets = out.sbo_targets
        if static is None:
            unpadded = unpad_lengths(lengths, width, device=device)
        else:
            unpadded = unpad_lengths(lengths, width,
                                     total_tokens=static.total_tokens(sum(lengths)),
                                     filler_sequences=static.filler_sequences,
                                     max_seqlen=width, device=device)
            cap = rows * masking_budget(width, mask_ratio_fraction(self.masker.mask_ratio))
            for name, count in (("masked tokens", mlm_positions.shape[0]),
                                ("SBO targets", sbo_targets.shape[0])):
                if count > cap:  # pragma: no cover - the budget bounds both
                    raise RuntimeError(f"{count} {name} exceed the static bound {cap}")
            mlm_positions = torch.cat([mlm_positions, mlm_positions.new_full(
                (cap - mlm_positions.shape[0],), rows * width)])
            filler = sbo_targets.new_zeros((cap - sbo_targets.shape[0], 5))
            filler[:, 4] = -100  # ignored by the loss; indices (0, 0, 0, 0) stay in range
            sbo_targets = torch.cat([sbo_targets, filler])
        return {"unpadded": unpadded, "mlm_positions": mlm_positions,
                "sbo_targets": sbo_targets}


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
