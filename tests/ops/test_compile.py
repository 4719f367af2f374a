"""torch.compile(fullgraph=True) over whole models: no graph breaks, same outputs."""

from __future__ import annotations

import pytest
import torch

import spanbert_fast as sf
from parity import assert_close


def test_compiled_model_fullgraph_matches_eager():
    model = sf.SpanBertModel(sf.SpanBertConfig.tiny(), backend="torch").eval()
    input_ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones_like(input_ids)
    mask[1, 9:] = 0
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(input_ids, attention_mask=mask).last_hidden_state
    expected = model(input_ids, attention_mask=mask).last_hidden_state
    assert_close(got, expected, max_rel=1e-5, name="compiled last_hidden_state")


def test_compiled_pretraining_step_fullgraph():
    torch.manual_seed(0)
    model = sf.SpanBertForPreTraining(sf.SpanBertConfig.tiny(), backend="torch").train()
    input_ids = torch.randint(5, 1000, (2, 16))
    labels = torch.full_like(input_ids, -100)
    labels[0, 3:6] = input_ids[0, 3:6]
    sbo = torch.tensor([[0, 2, 6, 0, 17], [0, 2, 6, 2, 18]])

    def step(ids, labels, sbo):
        return model(ids, labels=labels, sbo_targets=sbo).loss

    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(input_ids, labels, sbo)
    loss.backward()
    assert torch.isfinite(loss)
    assert model.cls.pair_target_predictions.mlp_layer_norm.linear1.weight.grad is not None


def _packed_batch(vocab_size):
    """A collated batch with its packed layout (rows of 16, 9 and 5 tokens)."""
    gen = torch.Generator().manual_seed(0)
    examples = [[2] + torch.randint(5, vocab_size, (n - 2,), generator=gen).tolist() + [3]
                for n in (16, 9, 5)]
    masker = sf.SpanMasker(mask_token_id=4, vocab_size=vocab_size,
                           is_continuation=torch.zeros(vocab_size, dtype=torch.bool),
                           special_token_ids=[0, 1, 2, 3, 4], seed=0)
    return sf.SpanMaskingCollator(masker, packed=True)(examples)


@pytest.mark.parametrize("backend", [
    "torch", pytest.param("triton", marks=pytest.mark.skipif(
        not sf.ops.dispatch.triton_ops_available(), reason="Triton kernels unavailable"))])
def test_compiled_model_runs_the_packed_path_given_packed_inputs(backend, monkeypatch):
    """Issue 14: with the caller's packed layout (cu_seqlens, indices, max_seqlen as host
    ints) nothing is data-dependent, so torch.compile(fullgraph=True) runs the padding-free
    path (on Triton through the kernels' custom ops, opaque nodes with fake
    implementations) instead of falling back to the padded one."""
    model = sf.SpanBertModel(sf.SpanBertConfig.tiny(), backend=backend).eval()
    batch = _packed_batch(model.config.vocab_size)
    args = (batch["input_ids"],)
    kwargs = dict(attention_mask=batch["attention_mask"], unpadded=batch["unpadded"])
    expected = model(*args, **kwargs).last_hidden_state
    ran = []
    packed = sf.SpanBertModel._encode_packed
    monkeypatch.setattr(sf.SpanBertModel, "_encode_packed",
                        lambda self, *a, **k: ran.append(True) or packed(self, *a, **k))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(*args, **kwargs).last_hidden_state
    assert ran, "the compiled forward did not trace the packed path"
    assert_close(got, expected, max_rel=1e-5, name="compiled packed last_hidden_state")


def test_compiled_packed_pretraining_step_matches_eager():
    torch.manual_seed(0)
    model = sf.SpanBertForPreTraining(sf.SpanBertConfig.tiny(), backend="torch").eval()
    batch = _packed_batch(model.config.vocab_size)
    expected = model(**batch).loss
    got = torch.compile(model, fullgraph=True, backend="aot_eager")(**batch).loss
    assert_close(got, expected, max_rel=1e-5, name="compiled packed loss")


@pytest.mark.parametrize("backend", [
    "torch", pytest.param("triton", marks=pytest.mark.skipif(
        not sf.ops.dispatch.triton_ops_available(), reason="Triton kernels unavailable"))])
def test_static_shapes_compile_once_for_batches_of_different_lengths(backend, monkeypatch):
    """Issue 14: SpanMaskingCollator(static_shapes=...) gives batches of different real
    lengths identical shapes and host ints, so a compiled step (what CUDA graphs capture
    under mode="reduce-overhead") is traced once and replayed. As in a fresh process:
    the thread's check state is new, and triton not yet probed when the model is built
    (the import must happen before the trace, not inside it)."""
    from torch._dynamo.utils import counters

    from spanbert_fast.ops import checks, dispatch

    monkeypatch.setattr(checks, "_checks", type(checks._checks)())
    if backend == "triton":
        from spanbert_fast.kernels import _common

        monkeypatch.setattr(_common, "_value_checks", type(_common._value_checks)())
        monkeypatch.setattr(dispatch, "_triton_probed", False)
        monkeypatch.setattr(dispatch, "_KERNEL_MODULES", {})
        monkeypatch.setattr(dispatch, "_kernel_import_errors", {})
    torch.manual_seed(0)
    model = sf.SpanBertForPreTraining(sf.SpanBertConfig.tiny(), backend=backend).eval()
    vocab = model.config.vocab_size
    masker = sf.SpanMasker(mask_token_id=4, vocab_size=vocab,
                           is_continuation=torch.zeros(vocab, dtype=torch.bool),
                           special_token_ids=[0, 1, 2, 3, 4], seed=0)
    collate = sf.SpanMaskingCollator(
        masker, static_shapes=sf.masking.StaticShapes(batch_size=3, max_length=24,
                                                      tokens_multiple_of=48))
    gen = torch.Generator().manual_seed(1)
    batches = [collate([[2] + torch.randint(5, vocab, (n - 2,), generator=gen).tolist() + [3]
                        for n in lengths]) for lengths in ((24, 10, 7), (12, 20), (5, 6, 30 - 11))]
    shapes = {tuple((k, tuple(v.shape)) for k, v in b.items() if isinstance(v, torch.Tensor))
              + (b["unpadded"].total_tokens, tuple(b["unpadded"].cu_seqlens.shape))
              for b in batches}
    assert len(shapes) == 1, shapes
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for batch in batches:
        assert_close(compiled(**batch).loss, model(**batch).loss, max_rel=1e-5,
                     name="compiled static loss")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
