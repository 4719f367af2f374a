"""Span-masking sampler throughput (pytest-benchmark): sequences per second at (256, 512).

    .venv/bin/python -m pytest benchmarks/test_bench_sampler.py -s

Variants, all on the same batch (full 512-token rows ``[CLS] pieces [SEP]`` over a
28996-id vocabulary with ~30 % ``##`` pieces, SpanBERT's defaults):

* ``numpy-reference``: :func:`spanbert_fast.masking.reference_span_masking`, the readable
  oracle (one Python loop per sequence) and the speed reference;
* ``cpp-<n>thread``: :class:`SpanMasker` on CPU tensors with ``torch.set_num_threads(n)``,
  end to end (input checks, the compiled op, SBO compaction), and ``cpp-op-<n>thread`` the
  op alone;
* ``cuda``: the same call on CUDA tensors (skipped without a GPU), synchronised.

Each test stores ``sequences_per_second`` in its ``extra_info``; the last one prints the
C++/NumPy ratios (the goal is >= 50x with one thread). Never collected by CI's test pass
(``testpaths = ["tests"]``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from spanbert_fast import _C
from spanbert_fast.masking import SpanMasker, load_native_ops, reference_span_masking

BATCH, SEQ = 256, 512
VOCAB_SIZE = 28996  # SpanBERT's cased WordPiece vocabulary
PAD, UNK, CLS, SEP, MASK = 0, 100, 101, 102, 103
SPECIAL_IDS = (PAD, UNK, CLS, SEP, MASK)

_sequences_per_second: dict = {}


@pytest.fixture(scope="module")
def batch():
    generator = torch.Generator().manual_seed(0)
    is_continuation = torch.rand(VOCAB_SIZE, generator=generator) < 0.3
    is_continuation[list(SPECIAL_IDS)] = False
    input_ids = torch.randint(1000, VOCAB_SIZE, (BATCH, SEQ), generator=generator)
    input_ids[:, 0] = CLS
    input_ids[:, -1] = SEP
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.bool)
    masker = SpanMasker(MASK, VOCAB_SIZE, is_continuation=is_continuation,
                        special_token_ids=SPECIAL_IDS, seed=0)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "masker": masker,
            "is_continuation": is_continuation, "offsets": torch.arange(BATCH)}


def _record(benchmark, name: str) -> None:
    seconds = benchmark.stats.stats.median
    _sequences_per_second[name] = BATCH / seconds
    benchmark.extra_info["sequences_per_second"] = round(BATCH / seconds, 1)
    benchmark.extra_info["batch"], benchmark.extra_info["seq"] = BATCH, SEQ


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _require_extension():
    if not _C.extension_available():
        pytest.skip(f"the compiled extension is not available: {_C.extension_load_error()}")


def test_numpy_reference(benchmark, batch):
    ids = batch["input_ids"].numpy()
    mask = batch["attention_mask"].numpy()
    table = batch["is_continuation"].numpy()
    offsets = batch["offsets"].numpy()

    def run():
        return reference_span_masking(ids, mask, mask_token_id=MASK, vocab_size=VOCAB_SIZE,
                                      is_continuation=table, special_token_ids=SPECIAL_IDS,
                                      seed=0, offsets=offsets)

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    _record(benchmark, "numpy-reference")


@pytest.mark.parametrize("num_threads", [1, 2])
def test_cpp_span_masker(benchmark, batch, threads, num_threads):
    _require_extension()
    torch.set_num_threads(num_threads)
    masker, ids, mask, offsets = (batch[k] for k in ("masker", "input_ids", "attention_mask",
                                                     "offsets"))
    benchmark.pedantic(masker, args=(ids, mask), kwargs={"offsets": offsets}, rounds=50,
                       iterations=1, warmup_rounds=3)
    _record(benchmark, f"cpp-{num_threads}thread")


@pytest.mark.parametrize("num_threads", [1, 2])
def test_cpp_op_alone(benchmark, batch, threads, num_threads):
    _require_extension()
    torch.set_num_threads(num_threads)
    masker, ids, mask, offsets = (batch[k] for k in ("masker", "input_ids", "attention_mask",
                                                     "offsets"))
    arguments = (ids, masker._token_flags, mask, None, offsets, None, masker.seed,
                 masker.mask_token_id, *masker._mask_ratio, masker._span_word_thresholds,
                 *masker._replace_thresholds, masker.max_span_len)
    benchmark.pedantic(load_native_ops().span_masking, args=arguments, rounds=50,
                       iterations=1, warmup_rounds=3)
    _record(benchmark, f"cpp-op-{num_threads}thread")


def test_cuda_span_masker(benchmark, batch):
    _require_extension()
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if not _C.load_extension().with_cuda:
        pytest.skip("the extension was built without CUDA kernels")
    masker = SpanMasker(MASK, VOCAB_SIZE, is_continuation=batch["is_continuation"],
                        special_token_ids=SPECIAL_IDS, seed=0).to("cuda")
    ids, mask, offsets = (batch[k].cuda() for k in ("input_ids", "attention_mask", "offsets"))

    def run():
        out = masker(ids, mask, offsets=offsets)
        torch.cuda.synchronize()
        return out

    benchmark.pedantic(run, rounds=50, iterations=1, warmup_rounds=3)
    _record(benchmark, "cuda")


def test_report_ratios(benchmark):
    """Prints sequences/s of every variant measured above and the ratio to NumPy."""
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # keeps pytest-benchmark happy
    reference = _sequences_per_second.get("numpy-reference")
    lines = [f"span masking at ({BATCH}, {SEQ}), sequences per second:"]
    for name, rate in _sequences_per_second.items():
        ratio = ""
        if reference and name != "numpy-reference":
            ratio = f"  ({rate / reference:.0f}x numpy)"
        lines.append(f"  {name:<18} {rate:>12.0f}{ratio}")
        benchmark.extra_info[name] = round(rate, 1)
    print("\n" + "\n".join(lines))
    assert np.isfinite(list(_sequences_per_second.values()) or [0.0]).all()
