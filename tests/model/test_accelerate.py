"""spanbert_fast.accelerate(hf_model): transformers models run on our ops, in place."""

from __future__ import annotations

import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

import spanbert_fast as sf  # noqa: E402
from parity import assert_close  # noqa: E402
from tiny_models import compare_param_grads, hf_config, make_batch, randomize, valid_rows  # noqa: E402

MAX_REL = 1e-5


@pytest.mark.parametrize("padding", ["exact", "packed"])
def test_bert_model_outputs_match_on_a_padded_batch(padding):
    hf = randomize(transformers.BertModel(hf_config("sdpa")), seed=1)
    input_ids, mask, types, positions = make_batch()
    expected = hf(input_ids, attention_mask=mask, token_type_ids=types, position_ids=positions,
                  output_hidden_states=True)
    params_before = [id(p) for p in hf.parameters()]
    keys_before = list(hf.state_dict())
    assert sf.accelerate(hf, backend="torch", padding=padding) is hf
    assert sf.is_accelerated(hf)
    assert [id(p) for p in hf.parameters()] == params_before, "parameters must stay the same objects"
    assert list(hf.state_dict()) == keys_before
    got = hf(input_ids, attention_mask=mask, token_type_ids=types, position_ids=positions,
             output_hidden_states=True)
    assert_close(valid_rows(got.last_hidden_state, mask),
                 valid_rows(expected.last_hidden_state, mask), max_rel=MAX_REL, name="accelerated")
    assert_close(got.pooler_output, expected.pooler_output, max_rel=MAX_REL, name="pooler")
    assert len(got.hidden_states) == len(expected.hidden_states)
    if padding == "exact":
        # Padded positions hold transformers' own values, not zeros.
        assert_close(got.last_hidden_state, expected.last_hidden_state, max_rel=MAX_REL,
                     name="padded positions, exact mode")
    else:
        assert torch.count_nonzero(got.last_hidden_state[~mask.bool()]) == 0


def test_question_answering_loss_and_gradients_match_with_padding():
    hf = randomize(transformers.BertForQuestionAnswering(hf_config("sdpa")), seed=2)
    reference = randomize(transformers.BertForQuestionAnswering(hf_config("sdpa")), seed=2)
    input_ids, mask, types, _ = make_batch(seed=3)
    start, end = torch.tensor([0, 5, 12]), torch.tensor([0, 6, 15])
    sf.accelerate(hf, backend="torch")
    got = hf(input_ids, attention_mask=mask, token_type_ids=types, start_positions=start,
             end_positions=end)
    expected = reference(input_ids, attention_mask=mask, token_type_ids=types,
                         start_positions=start, end_positions=end)
    assert_close(got.loss, expected.loss, max_rel=MAX_REL, name="QA loss (padded batch)")
    got.loss.backward()
    expected.loss.backward()
    assert compare_param_grads(hf, reference) == len(list(reference.parameters()))


def test_training_updates_the_shared_parameters_and_saves(tmp_path):
    hf = randomize(transformers.BertForQuestionAnswering(hf_config("sdpa")), seed=4)
    sf.accelerate(hf, backend="torch")
    hf.train()
    optimizer = torch.optim.SGD(hf.parameters(), lr=0.1)
    input_ids, mask, types, _ = make_batch(seed=5)
    loss = hf(input_ids, attention_mask=mask, start_positions=torch.tensor([0, 1, 2]),
              end_positions=torch.tensor([0, 3, 4])).loss
    loss.backward()
    optimizer.step()
    hf.eval()
    hf.save_pretrained(tmp_path)
    plain = transformers.BertForQuestionAnswering.from_pretrained(tmp_path).eval()
    assert_close(hf(input_ids, attention_mask=mask).start_logits,
                 plain(input_ids, attention_mask=mask).start_logits, max_rel=MAX_REL,
                 name="reloaded after a training step")


def test_unsupported_call_falls_back_with_one_warning():
    hf = randomize(transformers.BertModel(hf_config("eager")), seed=6)
    input_ids, mask, _, _ = make_batch()
    expected = hf(input_ids, attention_mask=mask, output_attentions=True)
    sf.accelerate(hf, backend="torch")
    with pytest.warns(UserWarning, match="output_attentions"):
        got = hf(input_ids, attention_mask=mask, output_attentions=True)
    assert got.attentions is not None and len(got.attentions) == len(expected.attentions)
    assert_close(got.last_hidden_state, expected.last_hidden_state, max_rel=MAX_REL,
                 name="fallback output")


def test_unsupported_config_is_refused_with_every_reason():
    config = hf_config("eager", hidden_act="gelu_new", is_decoder=True)
    hf = transformers.BertModel(config)
    with pytest.raises(sf.AccelerationError) as err:
        sf.accelerate(hf)
    assert "hidden_act='gelu_new'" in str(err.value) and "is_decoder=True" in str(err.value)
    with pytest.raises(sf.AccelerationError, match="contains no transformers.BertModel"):
        sf.accelerate(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="padding must be one of"):
        sf.accelerate(transformers.BertModel(hf_config("eager")), padding="zeros")


def test_moving_the_model_moves_what_the_fused_forward_uses(monkeypatch):
    """Our encoder is outside the transformers model's module tree; whatever its forward
    reads (position ids, and parameters where a conversion replaces them) must follow
    ``hf_model.to(...)``. The meta device stands in for ``.cuda()`` on a CPU-only machine."""
    from spanbert_fast import ops

    hf = randomize(transformers.BertModel(hf_config("sdpa")), seed=7).eval()
    keys_before = list(hf.state_dict())
    sf.accelerate(hf, backend="torch")
    assert list(hf.state_dict()) == keys_before
    hf.to("meta")
    # The range checks read values (.item()), which meta tensors do not have.
    monkeypatch.setattr(ops.checks, "values_checkable", lambda: False)
    input_ids, mask, types, _ = make_batch()
    seen = []
    encoder = getattr(hf, "_spanbert_fast_encoder")
    encoder.embeddings.register_forward_pre_hook(
        lambda module, args: seen.extend(a.device.type for a in args))
    got = hf(input_ids.to("meta"), attention_mask=mask.to("meta"),
             token_type_ids=types.to("meta"))
    assert seen == ["meta"] * 3, f"embedding inputs on {seen}"
    assert got.last_hidden_state.device.type == "meta"
    assert got.pooler_output.device.type == "meta"


@pytest.mark.parametrize("overwrite_params", [False, True])
def test_double_after_accelerate_matches_transformers_in_float64(overwrite_params):
    """``.double()`` after ``accelerate``: the fused forward runs in float64 on the converted
    tensors, also when torch replaces (rather than converts in place) the parameters."""
    import copy

    hf = randomize(transformers.BertModel(hf_config("sdpa")), seed=8).eval()
    reference = copy.deepcopy(hf).double()
    sf.accelerate(hf, backend="torch")
    previous = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(overwrite_params)
    try:
        hf.double()
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(previous)
    input_ids, mask, types, positions = make_batch(seed=9)
    expected = reference(input_ids, attention_mask=mask, token_type_ids=types)
    got = hf(input_ids, attention_mask=mask, token_type_ids=types)
    assert got.last_hidden_state.dtype == torch.float64
    assert_close(got.last_hidden_state, expected.last_hidden_state, max_rel=MAX_REL,
                 name="float64 after .double()")
    assert_close(got.pooler_output, expected.pooler_output, max_rel=MAX_REL, name="pooler")
    got = hf(input_ids, attention_mask=mask, token_type_ids=types, position_ids=positions)
    expected = reference(input_ids, attention_mask=mask, token_type_ids=types,
                         position_ids=positions)
    assert_close(got.last_hidden_state, expected.last_hidden_state, max_rel=MAX_REL,
                 name="float64 after .double(), explicit position_ids")


@pytest.fixture
def fresh_warnings(monkeypatch):
    """The fallback warns once per reason per process; forget earlier tests' warnings."""
    import importlib

    monkeypatch.setattr(importlib.import_module("spanbert_fast.accelerate"), "_warned", set())


def _tensor_argument(name, hf, input_ids):
    config = hf.config
    if name == "inputs_embeds":
        return {"input_ids": None, name: hf.embeddings.word_embeddings(input_ids).detach()}
    if name == "head_mask":
        return {"input_ids": input_ids,
                name: torch.rand(config.num_hidden_layers, config.num_attention_heads)}
    cross = torch.randn(input_ids.shape[0], 5, config.hidden_size)
    if name == "encoder_hidden_states":
        return {"input_ids": input_ids, name: cross}
    return {"input_ids": input_ids, "encoder_hidden_states": cross,
            name: torch.ones(input_ids.shape[0], 5, dtype=torch.int64)}


@pytest.mark.parametrize("name", ["inputs_embeds", "head_mask", "encoder_hidden_states",
                                  "encoder_attention_mask"])
def test_tensor_arguments_fall_back_with_the_warning(name, fresh_warnings):
    """Issue 18.3: these arrive as tensors, whose truth value is ambiguous; the fused
    forward must fall back (warning naming the argument) and give exactly what the
    un-accelerated model gives for the same call."""
    import copy

    hf = randomize(transformers.BertModel(hf_config("eager")), seed=10).eval()
    plain = copy.deepcopy(hf)
    input_ids, mask, _, _ = make_batch(seed=11)
    arguments = _tensor_argument(name, hf, input_ids)
    expected = plain(attention_mask=mask, **arguments)
    sf.accelerate(hf, backend="torch")
    with pytest.warns(UserWarning, match=f"because of .*{name} "):
        got = hf(attention_mask=mask, **arguments)
    assert_close(got.last_hidden_state, expected.last_hidden_state, max_rel=MAX_REL,
                 name=f"fallback output with {name}")


def _pickled(model):
    import io

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _deep_copied(model):
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("clone", [_pickled, _deep_copied], ids=["torch.save/load", "deepcopy"])
def test_an_accelerated_model_round_trips_through_pickle_and_deepcopy(clone):
    """Issue 18.4: torch.load(weights_only=False) of a saved accelerated model failed
    (the bound ``_accelerated_forward`` could not be found again). The clone must still be
    accelerated, its fused encoder must share the clone's parameters (not the original's),
    and a training step on the clone must show in the fused forward."""
    hf = randomize(transformers.BertForQuestionAnswering(hf_config("sdpa")), seed=12)
    sf.accelerate(hf, backend="torch")
    input_ids, mask, types, _ = make_batch(seed=13)
    hf.eval()
    expected = hf(input_ids, attention_mask=mask, token_type_ids=types).start_logits

    twin = clone(hf)
    assert sf.is_accelerated(twin)
    bert = twin.bert
    encoder = getattr(bert, "_spanbert_fast_encoder")
    assert encoder is not getattr(hf.bert, "_spanbert_fast_encoder")
    ours = dict(encoder.named_parameters())
    for name, param in bert.named_parameters():
        if name in ours:
            assert ours[name] is param, f"{name}: the fused encoder lost the shared parameter"
    assert_close(twin(input_ids, attention_mask=mask, token_type_ids=types).start_logits,
                 expected, max_rel=MAX_REL, name="clone's fused output")

    twin.train()
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.5)
    twin(input_ids, attention_mask=mask, start_positions=torch.tensor([0, 1, 2]),
         end_positions=torch.tensor([0, 3, 4])).loss.backward()
    optimizer.step()
    twin.eval()
    fused = bert(input_ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    theirs = transformers.BertModel.forward(bert, input_ids, attention_mask=mask,
                                            token_type_ids=types).last_hidden_state
    assert_close(fused, theirs, max_rel=MAX_REL, name="fused vs transformers after a step")
    assert not torch.equal(twin(input_ids, attention_mask=mask).start_logits,
                           hf(input_ids, attention_mask=mask).start_logits), \
        "the step on the clone must not be shared with the original"


def _enable_gradient_checkpointing(hf):
    import warnings

    with warnings.catch_warnings():
        # transformers 5.23 deprecates the name (an alias of activation_checkpointing_enable).
        warnings.simplefilter("ignore", FutureWarning)
        hf.gradient_checkpointing_enable()


def _enable_gradient_checkpointing_as_transformers_4(hf):
    """transformers 4.x kept the flag and the checkpoint function on the BertEncoder, not
    on each layer."""
    import torch.utils.checkpoint

    for layer in hf.bert.encoder.layer:
        layer.gradient_checkpointing = False
    hf.bert.encoder.gradient_checkpointing = True
    hf.bert.encoder._gradient_checkpointing_func = functools.partial(
        torch.utils.checkpoint.checkpoint, use_reentrant=False)


@pytest.mark.parametrize("order", ["enabled after accelerate", "enabled before accelerate",
                                   "on the encoder, as transformers 4.x"])
def test_gradient_checkpointing_recomputes_the_fused_layers(order):
    """Issue 18.10: ``gradient_checkpointing_enable()`` was silently ignored by the fused
    forward (every activation kept). Each fused layer must now run once in the forward and
    once more in the backward, with the gradients of transformers without checkpointing."""
    config = hf_config("sdpa", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    hf = randomize(transformers.BertForQuestionAnswering(config), seed=14)
    reference = randomize(transformers.BertForQuestionAnswering(config), seed=14)
    if order == "enabled before accelerate":
        _enable_gradient_checkpointing(hf)
    sf.accelerate(hf, backend="torch")
    if order == "enabled after accelerate":
        _enable_gradient_checkpointing(hf)
    elif order.startswith("on the encoder"):
        _enable_gradient_checkpointing_as_transformers_4(hf)
    hf.train()
    reference.train()
    calls = []
    encoder = getattr(hf.bert, "_spanbert_fast_encoder")
    for index, layer in enumerate(encoder.encoder.layer):
        layer.attention.register_forward_hook(lambda *_, index=index: calls.append(index))
    input_ids, mask, types, _ = make_batch(seed=15)
    start, end = torch.tensor([0, 5, 12]), torch.tensor([0, 6, 15])
    got = hf(input_ids, attention_mask=mask, token_type_ids=types, start_positions=start,
             end_positions=end)
    layers = list(range(len(encoder.encoder.layer)))
    assert calls == layers
    got.loss.backward()
    assert sorted(calls) == sorted(layers * 2), f"layers run {calls}: no recomputation"
    expected = reference(input_ids, attention_mask=mask, token_type_ids=types,
                         start_positions=start, end_positions=end)
    expected.loss.backward()
    assert_close(got.loss, expected.loss, max_rel=MAX_REL, name="loss with checkpointing")
    assert compare_param_grads(hf, reference) == len(list(reference.parameters()))

    calls.clear()
    hf.eval()  # checkpointing is for training only, as in transformers
    hf(input_ids, attention_mask=mask).start_logits.sum().backward()
    assert calls == layers
