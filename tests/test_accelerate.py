"""spanbert_fast.accelerate(hf_model): transformers models run on our ops, in place."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import spanbert_fast as sf  # noqa: E402
from assertions import assert_close  # noqa: E402
from test_parity import compare_param_grads, hf_config, make_batch, randomize, valid_rows  # noqa: E402

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
    monkeypatch.setattr(ops, "_values_checkable", lambda: False)
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
