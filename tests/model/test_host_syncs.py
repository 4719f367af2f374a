"""Host synchronisations of a step, counted on the CPU (run as a script, it prints the
table of issue 14 for 2 and 24 layers, both backends: a few minutes, mostly the 24-layer
Triton step in the interpreter).

Every time Python reads a value of a CUDA tensor (``.item()``, ``int(t)``, ``bool(t)``,
``.tolist()``, ``nonzero``, boolean-mask indexing, ``repeat_interleave`` without
``output_size``) the host waits for the GPU to drain its queue. The CPU run makes the same
calls a GPU run would, so a ``TorchDispatchMode`` that records those ops (plus a spy on
``Tensor.tolist``, which does not dispatch) counts them here, on the torch backend and on
the Triton backend in the interpreter.

Budget (issue 14): a pretraining step (forward + backward) reads the device once, in the
model's one batched value check (which also reads the sizes the step needs); an inference
forward once; neither grows with depth. Before: 29 (torch) and 42 (Triton) for 2 layers.
"""

from __future__ import annotations

import contextlib

import os

if __name__ == "__main__":  # run as a script (the sync table): before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import collections
import dataclasses
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import spanbert_fast as sf
from spanbert_fast import ops

_SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default,
             torch.ops.aten.equal.default}  # torch.equal returns a host bool


class HostSyncs(TorchDispatchMode):
    """Counts the ops that make the host wait for the device, with where they came from."""

    def __init__(self):
        super().__init__()
        self.where = collections.Counter()
        self.active = False  # the Tensor.tolist spy counts only inside ``with``

    def __enter__(self):
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc):
        self.active = False
        return super().__exit__(*exc)

    def record(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()
                  if "spanbert_fast" in f.filename or "/kernels/" in f.filename]
        place = f"{frames[-1].filename.rsplit('/', 1)[-1]}:{frames[-1].lineno}" if frames else "?"
        self.where[f"{what} @ {place}"] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if func in _SYNC_OPS:
            self.record(str(func))
        elif packet is torch.ops.aten.index and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            self.record("boolean index")
        elif packet is torch.ops.aten.repeat_interleave and kwargs.get("output_size") is None:
            self.record("repeat_interleave without output_size")
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.where.values())


@contextlib.contextmanager
def tolist_counted(counter: "HostSyncs"):
    """``Tensor.tolist`` (a device read no dispatch mode sees) counted by ``counter`` while
    it is active, within the block."""
    tolist = torch.Tensor.tolist

    def spy(self):
        if counter.active:
            counter.record("Tensor.tolist")
        return tolist(self)

    torch.Tensor.tolist = spy
    try:
        yield counter
    finally:
        torch.Tensor.tolist = tolist


@pytest.fixture
def count_syncs():
    with tolist_counted(HostSyncs()) as counter:
        yield counter


def _batch(config, seed=0):
    """A padded batch with labels and SBO targets from the span masker."""
    gen = torch.Generator().manual_seed(seed)
    vocab = config.vocab_size
    ids = torch.randint(5, vocab, (3, 40), generator=gen)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    mask[2, 17:] = 0
    ids = ids * mask
    masker = sf.SpanMasker(mask_token_id=4, vocab_size=vocab,
                           is_continuation=torch.zeros(vocab, dtype=torch.bool),
                           special_token_ids=[0, 1, 2, 3, 4], seed=seed)
    masked = masker(ids, mask)
    assert masked.sbo_targets.shape[0] > 0 and (masked.labels != -100).any()
    return masked, mask


def _triton_ready() -> bool:
    return ops.dispatch.triton_ops_available()


BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not _triton_ready(), reason="Triton kernels unavailable"))]


@pytest.mark.parametrize("layers", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pretraining_step_reads_the_device_once(backend, layers, count_syncs):
    config = sf.SpanBertConfig.tiny(num_hidden_layers=layers)
    model = sf.SpanBertForPreTraining(config, backend=backend).train()
    masked, mask = _batch(config)
    with count_syncs:
        loss = model(masked.input_ids, mask, labels=masked.labels,
                     sbo_targets=masked.sbo_targets).loss
        loss.backward()
    assert torch.isfinite(loss)
    assert count_syncs.total <= 1, dict(count_syncs.where)


@pytest.mark.parametrize("layers", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_an_inference_forward_reads_the_device_once(backend, layers, count_syncs):
    config = sf.SpanBertConfig.tiny(num_hidden_layers=layers)
    model = sf.SpanBertModel(config, backend=backend).eval()
    masked, mask = _batch(config)
    with torch.no_grad(), count_syncs:
        model(masked.input_ids, attention_mask=mask)
    assert count_syncs.total <= 1, dict(count_syncs.where)


def test_without_value_checks_the_step_reads_only_what_it_must_size(count_syncs, monkeypatch):
    """check_values=False (or SPANBERT_FAST_CHECK_VALUES=0) skips the batched check: the
    unpadding and the masked-row selection then read their sizes (nonzero), 2 reads."""
    config = sf.SpanBertConfig.tiny()
    model = sf.SpanBertForPreTraining(config, backend="torch").train()
    model.check_values = False
    masked, mask = _batch(config)
    with count_syncs:
        model(masked.input_ids, mask, labels=masked.labels,
              sbo_targets=masked.sbo_targets).loss.backward()
    assert count_syncs.total <= 2, dict(count_syncs.where)
    assert not any("tolist" in where for where in count_syncs.where), "the check ran"
    # The same through the environment variable.
    model.check_values = True
    monkeypatch.setenv("SPANBERT_FAST_CHECK_VALUES", "0")
    count_syncs.where.clear()
    with count_syncs:
        model(masked.input_ids, mask, labels=masked.labels, sbo_targets=masked.sbo_targets)
    assert count_syncs.total <= 2 and not any("tolist" in w for w in count_syncs.where)


@pytest.mark.parametrize("field, value, message", [
    ("input_ids", 10**6, "input_ids values must lie in"),
    ("labels", 10**6, "labels"),
    ("sbo_left", 10**3, "sbo_targets"),
    ("sbo_label", -5, "sbo_targets"),
])
def test_bad_values_still_raise_naming_the_argument(field, value, message):
    config = sf.SpanBertConfig.tiny()
    model = sf.SpanBertForPreTraining(config, backend="torch")
    masked, mask = _batch(config)
    ids, labels, sbo = masked.input_ids.clone(), masked.labels.clone(), masked.sbo_targets.clone()
    if field == "input_ids":
        ids[0, 3] = value
    elif field == "labels":
        labels[labels != -100] = value
    elif field == "sbo_left":
        sbo[0, 1] = value
    else:
        sbo[0, 4] = value
    with pytest.raises(ValueError, match=message):
        model(ids, mask, labels=labels, sbo_targets=sbo)


def test_the_batched_check_gives_the_same_step_as_unchecked():
    """The sizes read by the batched check (real tokens, longest row, masked rows) replace
    nonzero and the padded width: the step must not change by a bit."""
    config = sf.SpanBertConfig.tiny()
    model = sf.SpanBertForPreTraining(config, backend="torch").eval()
    masked, mask = _batch(config)
    checked = model(masked.input_ids, mask, labels=masked.labels,
                    sbo_targets=masked.sbo_targets)
    model.check_values = False
    unchecked = model(masked.input_ids, mask, labels=masked.labels,
                      sbo_targets=masked.sbo_targets)
    assert torch.equal(checked.mlm_loss, unchecked.mlm_loss)
    assert torch.equal(checked.sbo_loss, unchecked.sbo_loss)


@pytest.mark.parametrize("layers", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_accelerate_exact_padding_reads_the_mask_once_not_per_layer(backend, layers,
                                                                   count_syncs):
    """accelerate(padding="exact") keeps the padded layout, where the Triton kernel needs
    right padding: the mask was checked for it per layer, forward and backward (torch.equal,
    a host sync each). The batched check reads it once."""
    transformers = pytest.importorskip("transformers")
    from tiny_models import hf_config, make_batch, randomize

    hf = randomize(transformers.BertModel(hf_config("sdpa", num_hidden_layers=layers)), seed=3)
    sf.accelerate(hf, backend=backend, padding="exact")
    hf.train()
    ids, mask, _, _ = make_batch()
    with count_syncs:
        hf(ids, attention_mask=mask).last_hidden_state.square().sum().backward()
    assert count_syncs.total <= 1, dict(count_syncs.where)


@pytest.mark.skipif(not _triton_ready(), reason="Triton kernels unavailable")
def test_a_left_padded_mask_known_from_the_batched_check_is_still_refused():
    q = torch.randn(2, 2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :2] = False
    with ops.values_checked(right_padded=False):
        with pytest.raises(ops.BackendUnavailableError, match="not right padding"):
            ops.attention(q, q, q, key_padding_mask=mask, backend="triton")


# ---------------------------------------------------------------------------------------
# Packed inputs from the collator: the step needs no size from the device.
# ---------------------------------------------------------------------------------------
def _collated(config, seed=0, static_shapes=None):
    """A batch from SpanMaskingCollator(packed=True): three rows of 40, 30 and 17 tokens."""
    gen = torch.Generator().manual_seed(seed)
    examples = [[2] + torch.randint(5, config.vocab_size, (n - 2,), generator=gen).tolist()
                + [3] for n in (40, 30, 17)]
    masker = sf.SpanMasker(mask_token_id=4, vocab_size=config.vocab_size,
                           is_continuation=torch.zeros(config.vocab_size, dtype=torch.bool),
                           special_token_ids=[0, 1, 2, 3, 4], seed=seed)
    batch = sf.SpanMaskingCollator(masker, packed=True, static_shapes=static_shapes)(examples)
    assert batch["sbo_targets"].shape[0] > 0 and batch["mlm_positions"].numel() > 0
    return batch


STATIC = [None, sf.masking.StaticShapes(batch_size=4, max_length=48, tokens_multiple_of=64)]


@pytest.mark.parametrize("static_shapes", STATIC, ids=["packed", "static"])
@pytest.mark.parametrize("layers", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_packed_pretraining_step_without_value_checks_never_reads_the_device(
        backend, layers, static_shapes, count_syncs):
    """Issue 14: given the packed layout from the collator (cu_seqlens, indices and sizes
    known on the host) and check_values=False, a step (forward + backward) makes 0 host
    syncs, at any depth. Before: 2 (unpad's nonzero and the masked rows' nonzero)."""
    config = sf.SpanBertConfig.tiny(num_hidden_layers=layers)
    model = sf.SpanBertForPreTraining(config, backend=backend).train()
    model.check_values = False
    batch = _collated(config, static_shapes=static_shapes)
    with count_syncs:
        loss = model(**batch).loss
        loss.backward()
    assert count_syncs.total == 0, dict(count_syncs.where)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_fp16_autocast_the_step_still_never_reads_the_device(backend, count_syncs):
    """The fp16 linear cross-entropy takes the loss-scaled path, whose backward runs after
    the forward's values_checked() block (on the autograd thread, on CUDA): it must not
    check the labels again. Before: 2 syncs (one tolist per loss) on the Triton path."""
    config = sf.SpanBertConfig.tiny(num_hidden_layers=2)
    model = sf.SpanBertForPreTraining(config, backend=backend).train()
    model.check_values = False
    batch = _collated(config)
    with count_syncs:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = model(**batch).loss
        loss.backward()
    assert count_syncs.total == 0, dict(count_syncs.where)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("layers", [2, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_packed_inference_forward_without_value_checks_never_reads_the_device(
        backend, layers, count_syncs):
    config = sf.SpanBertConfig.tiny(num_hidden_layers=layers)
    model = sf.SpanBertModel(config, backend=backend).eval()
    model.check_values = False
    batch = _collated(config)
    with torch.no_grad(), count_syncs:
        model(batch["input_ids"], attention_mask=batch["attention_mask"],
              unpadded=batch["unpadded"])
    assert count_syncs.total == 0, dict(count_syncs.where)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_checked_packed_step_reads_the_device_once_and_matches_the_padded_step(
        backend, count_syncs):
    config = sf.SpanBertConfig.tiny()
    torch.manual_seed(0)
    model = sf.SpanBertForPreTraining(config, backend=backend).eval()
    batch = _collated(config)
    with count_syncs:
        packed = model(**batch)
    assert count_syncs.total == 1, dict(count_syncs.where)
    padded = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                   sbo_targets=batch["sbo_targets"])
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-6, atol=1e-6)


def _broken(batch, what):
    """A copy of the collated batch with one packed argument made wrong."""
    batch = dict(batch)
    where = batch["unpadded"]
    if what == "cu_seqlens":
        cu = where.cu_seqlens.clone()
        cu[1] -= 1  # row 0 is one token shorter than its mask says
        batch["unpadded"] = dataclasses.replace(where, cu_seqlens=cu)
    elif what == "indices":
        indices = where.indices.clone()
        indices[-1] = where.seq * 2 - 1  # a padded position of row 1
        batch["unpadded"] = dataclasses.replace(where, indices=indices)
    elif what == "max_seqlen":
        batch["unpadded"] = dataclasses.replace(where, max_seqlen=8)
    elif what == "batch":
        batch["unpadded"] = dataclasses.replace(where, batch=2)
    else:
        batch["mlm_positions"] = batch["mlm_positions"][1:]
    return batch


@pytest.mark.parametrize("what, message", [
    ("cu_seqlens", "unpadded.cu_seqlens must hold each row's real length"),
    ("indices", "unpadded.indices must be the flat positions"),
    ("max_seqlen", "steps <= max_seqlen=8"),
    ("batch", "unpadded describes a \\(2, 40\\) batch"),
    ("mlm_positions", "mlm_positions must be the flat positions"),
])
def test_bad_packed_input_raises_naming_the_argument(what, message):
    config = sf.SpanBertConfig.tiny()
    model = sf.SpanBertForPreTraining(config, backend="torch")
    with pytest.raises(ValueError, match=message):
        model(**_broken(_collated(config), what))


def test_static_shapes_do_not_change_the_loss():
    """The fillers (tokens in sequences of their own, MLM positions batch * seq, SBO
    targets with label -100) add nothing to the loss or the gradients."""
    config = sf.SpanBertConfig.tiny()
    torch.manual_seed(0)
    model = sf.SpanBertForPreTraining(config, backend="torch").eval()
    plain = _collated(config)
    static = _collated(config, static_shapes=STATIC[1])
    assert static["unpadded"].total_tokens == 128 and static["input_ids"].shape == (4, 48)
    expected = model(**plain).loss
    got = model(**static).loss
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    expected_grad = torch.autograd.grad(expected, model.bert.embeddings.word_embeddings.weight)
    got_grad = torch.autograd.grad(model(**static).loss,
                                   model.bert.embeddings.word_embeddings.weight)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------
# `python tests/model/test_host_syncs.py`: the table of issue 14's closing note.
# ---------------------------------------------------------------------------------------
def count_step_syncs(layers: int, backend: str, packed: bool, check_values: bool) -> int:
    """Host syncs of one pretraining step (forward + backward) of a tiny model."""
    config = sf.SpanBertConfig.tiny(num_hidden_layers=layers)
    model = sf.SpanBertForPreTraining(config, backend=backend).train()
    model.check_values = check_values
    batch = _collated(config)
    if not packed:
        batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "sbo_targets")}
    with tolist_counted(HostSyncs()) as counter, counter:
        model(**batch).loss.backward()
    return counter.total


if __name__ == "__main__":
    backends = ["torch"] + (["triton"] if _triton_ready() else [])
    print("host syncs of one pretraining step (forward + backward), tiny model")
    print(f"{'layers':>6} {'backend':>7} {'padded+checks':>13} {'padded':>7} "
          f"{'packed+checks':>13} {'packed':>7}")
    for layers in (2, 24):
        for backend in backends:
            row = [count_step_syncs(layers, backend, packed, check)
                   for packed in (False, True) for check in (True, False)]
            print(f"{layers:>6} {backend:>7} " + " ".join(
                f"{n:>{w}}" for n, w in zip(row, (13, 7, 13, 7))))
