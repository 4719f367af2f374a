"""torch.compile(fullgraph=True) over whole models: no graph breaks, same outputs."""

from __future__ import annotations

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
