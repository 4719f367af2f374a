"""The fast torch backend (``backend="torch"``): SDPA attention, padded and packed, and the
padding-free encoder layout on it.

The oracle is :mod:`spanbert_fast.ops.reference` (explicit softmax, fp32/fp64); the torch
backend must match it to rounding, and whole models on either layout must match
transformers (outputs at real positions and every parameter gradient within 1e-5).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import spanbert_fast as sf  # noqa: E402
from spanbert_fast import modeling, ops  # noqa: E402
from spanbert_fast.ops import reference, torch_backend  # noqa: E402
from parity import assert_close, assert_within_2x_of_torch  # noqa: E402
from tiny_models import (LAYERS, SEQ, compare_param_grads, hf_config, make_batch,  # noqa: E402
                         randomize, valid_rows)

FP64_REL = 1e-12
FP32_REL = 1e-5


def _packed_inputs(lengths, heads, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    qkv = [(torch.randn(total, heads, head_dim, generator=gen)).to(dtype).requires_grad_()
           for _ in range(3)]
    return qkv, cu


def _grads(out, inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    dout = torch.randn(out.shape, generator=gen).to(out.dtype)
    return [out, *torch.autograd.grad(out, inputs, dout)]


@pytest.mark.parametrize("dtype, rel", [(torch.float64, FP64_REL), (torch.float32, FP32_REL)])
@pytest.mark.parametrize("lengths", [(7, 1, 0, 13, 9), (6,), (127, 5)])
def test_packed_attention_matches_the_oracle(dtype, rel, lengths):
    """Lengths 0 and 1, a single sequence, and a max_seqlen bound above the longest (the
    bound the model passes without reading the lengths)."""
    (q, k, v), cu = _packed_inputs(lengths, 3, 16, dtype)
    bound = max(lengths) + 5
    got = _grads(torch_backend.attention(q, k, v, None, cu, bound, 0.3, 0.0), (q, k, v))
    want = _grads(reference.attention(q, k, v, None, cu, bound, 0.3, 0.0), (q, k, v))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(g, w, max_rel=rel, name=f"packed {name}")


@pytest.mark.parametrize("dtype, rel", [(torch.float64, FP64_REL), (torch.float32, FP32_REL)])
def test_padded_attention_matches_the_oracle_with_an_all_padding_row(dtype, rel):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(4, 2, 11, 8, generator=gen).to(dtype).requires_grad_()
               for _ in range(3))
    mask = torch.rand(4, 11, generator=gen) > 0.4
    mask[1] = False  # a row with no key at all: zeros, and no NaN anywhere in the gradients
    got = _grads(torch_backend.attention(q, k, v, mask, None, 0, 0.35, 0.0), (q, k, v))
    want = _grads(reference.attention(q, k, v, mask, None, 0, 0.35, 0.0), (q, k, v))
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(g, w, max_rel=rel, name=f"padded {name}")
    assert torch.count_nonzero(got[0][1]) == 0


def test_bf16_packed_attention_within_2x_of_plain_torch():
    (q, k, v), cu = _packed_inputs((9, 30, 2), 2, 32, torch.bfloat16, seed=4)
    oracle = reference.attention(q.double(), k.double(), v.double(), None, cu, 30, 0.2, 0.0)
    plain = reference.attention(q, k, v, None, cu, 30, 0.2, 0.0, upcast=False)
    got = torch_backend.attention(q, k, v, None, cu, 30, 0.2, 0.0)
    assert got.dtype == torch.bfloat16
    assert_within_2x_of_torch(got, plain, oracle, name="bf16 packed out")


def test_ops_attention_torch_backend_runs_the_fast_backend(monkeypatch):
    """backend="torch" is the SDPA backend, not the oracle (which stays the reference)."""
    calls = []
    real = torch_backend.attention

    def spy(*args):
        calls.append(args[4] is not None)
        return real(*args)

    monkeypatch.setattr(torch_backend, "attention", spy)
    (q, k, v), cu = _packed_inputs((3, 4), 2, 8, torch.float32)
    ops.attention(q, k, v, cu_seqlens=cu, max_seqlen=4, backend="torch")
    ops.attention(q[:4].view(1, 4, 2, 8).transpose(1, 2), k[:4].view(1, 4, 2, 8).transpose(1, 2),
                  v[:4].view(1, 4, 2, 8).transpose(1, 2), backend="torch")
    assert calls == [True, False]


# ---------------------------------------------------------------------------------------
# The encoder's layouts on the torch backend
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("bert")
    randomize(transformers.BertModel(hf_config("eager")), seed=3).save_pretrained(path)
    return path


@pytest.mark.parametrize("layout", ["packed", "padded", "auto"])
def test_each_layout_matches_transformers(checkpoint_dir, layout):
    hf = transformers.BertModel.from_pretrained(checkpoint_dir).eval()
    ours = sf.SpanBertModel.from_pretrained(checkpoint_dir, backend="torch", layout=layout)
    assert ours.layout == layout
    input_ids, mask, types, positions = make_batch()
    kwargs = dict(token_type_ids=types, position_ids=positions)
    expected = hf(input_ids, attention_mask=mask, output_hidden_states=True, **kwargs)
    got = ours(input_ids, attention_mask=mask, output_hidden_states=True, **kwargs)
    assert_close(valid_rows(got.last_hidden_state, mask),
                 valid_rows(expected.last_hidden_state, mask), max_rel=FP32_REL,
                 name=f"{layout} last_hidden_state")
    for i, (g, e) in enumerate(zip(got.hidden_states, expected.hidden_states)):
        assert_close(valid_rows(g, mask), valid_rows(e, mask), max_rel=FP32_REL,
                     name=f"{layout} hidden_states[{i}]")
    assert len(got.hidden_states) == LAYERS + 1
    assert torch.count_nonzero(got.last_hidden_state[~mask.bool()]) == 0
    assert_close(got.pooler_output, expected.pooler_output, max_rel=FP32_REL, name="pooler")

    weights = torch.randn(hf.config.hidden_size, generator=torch.Generator().manual_seed(5))

    def scalar(out):
        return ((valid_rows(out.last_hidden_state, mask) * weights).sum()
                + (out.pooler_output * weights).sum())

    scalar(hf(input_ids, attention_mask=mask, **kwargs)).backward()
    scalar(ours(input_ids, attention_mask=mask, **kwargs)).backward()
    assert compare_param_grads(ours, hf) == len(list(ours.parameters()))


def _packs(model, input_ids, mask, monkeypatch) -> bool:
    seen = []
    real = modeling.SpanBertModel._encode_packed

    def spy(self, *args):
        seen.append(True)
        return real(self, *args)

    monkeypatch.setattr(modeling.SpanBertModel, "_encode_packed", spy)
    model(input_ids, attention_mask=mask)
    monkeypatch.undo()
    return bool(seen)


def test_auto_packs_a_padded_batch_and_keeps_a_full_one_padded(monkeypatch):
    model = sf.SpanBertModel(sf.SpanBertConfig.tiny(), backend="torch").eval()
    input_ids, mask, _, _ = make_batch()  # lengths 1, 7, 16 of 16: 50% real tokens
    assert mask.float().mean() < modeling.PACK_BELOW_REAL_SHARE
    assert _packs(model, input_ids, mask, monkeypatch)
    full = torch.ones_like(mask)
    assert not _packs(model, input_ids, full, monkeypatch)
    assert not _packs(model, input_ids, None, monkeypatch)
    # Nearly full: one padded position in 48 is above the share, the gathers would cost more.
    nearly = full.clone()
    nearly[0, -1] = 0
    assert nearly.float().mean() >= modeling.PACK_BELOW_REAL_SHARE
    assert not _packs(model, input_ids, nearly, monkeypatch)


def test_forced_layouts_are_honoured(monkeypatch):
    input_ids, mask, _, _ = make_batch()
    packed = sf.SpanBertModel(sf.SpanBertConfig.tiny(), backend="torch", layout="packed").eval()
    padded = sf.SpanBertModel(sf.SpanBertConfig.tiny(), backend="torch", layout="padded").eval()
    padded.load_state_dict(packed.state_dict())
    assert _packs(packed, input_ids, torch.ones_like(mask), monkeypatch)
    assert not _packs(padded, input_ids, mask, monkeypatch)
    with torch.no_grad():
        assert_close(packed(input_ids, attention_mask=mask).last_hidden_state,
                     padded(input_ids, attention_mask=mask).last_hidden_state,
                     max_rel=FP32_REL, name="packed vs padded")


@pytest.mark.parametrize("cls", [sf.SpanBertModel, sf.SpanBertForPreTraining,
                                 sf.SpanBertForQuestionAnswering])
def test_layout_is_checked_and_reaches_the_encoder(cls):
    with pytest.raises(ValueError, match="layout must be one of"):
        cls(sf.SpanBertConfig.tiny(), layout="unpadded")
    model = cls(sf.SpanBertConfig.tiny(), layout="padded")
    encoder = model if cls is sf.SpanBertModel else model.bert
    assert encoder.layout == "padded" and model.layout == "padded"
    model.layout = "packed"  # on a model with heads, setting it reaches the encoder
    assert encoder.layout == "packed" and model.layout == "packed"
    with pytest.raises(ValueError, match="layout must be one of"):
        model.layout = "bogus"


def test_packed_training_with_dropout_is_seeded_and_finite():
    """Train mode on the packed path: attention dropout draws from torch's RNG, so one seed
    gives one result, and the gradients are finite."""
    config = sf.SpanBertConfig.tiny()
    model = sf.SpanBertModel(config, backend="torch", layout="packed").train()
    input_ids, mask, _, _ = make_batch()
    input_ids = input_ids % config.vocab_size

    def run():
        torch.manual_seed(11)
        model.zero_grad()
        out = model(input_ids, attention_mask=mask).last_hidden_state
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    first, first_grads = run()
    second, second_grads = run()
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(first_grads, second_grads))
    assert all(torch.isfinite(g).all() for g in first_grads)
    torch.manual_seed(12)
    assert not torch.equal(first, model(input_ids, attention_mask=mask).last_hidden_state)
