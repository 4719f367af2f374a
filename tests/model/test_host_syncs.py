"""Host synchronisations of a step, counted on the CPU.

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

import collections
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


@pytest.fixture
def count_syncs(monkeypatch):
    counter = HostSyncs()
    tolist = torch.Tensor.tolist

    def spy(self):
        counter.record("Tensor.tolist")
        return tolist(self)

    monkeypatch.setattr(torch.Tensor, "tolist", spy)
    return counter


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
