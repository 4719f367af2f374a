"""Bad input to the models gives a ValueError/TypeError that names the argument."""

from __future__ import annotations

import pytest
import torch

import spanbert_fast as sf


@pytest.fixture(scope="module")
def model():
    return sf.SpanBertModel(sf.SpanBertConfig.tiny(max_position_embeddings=32), backend="torch").eval()


@pytest.fixture(scope="module")
def pretraining():
    return sf.SpanBertForPreTraining(sf.SpanBertConfig.tiny(max_position_embeddings=32),
                                     backend="torch").eval()


def ids(batch=2, seq=8):
    return torch.randint(0, 1000, (batch, seq))


@pytest.mark.parametrize("make, error, match", [
    (lambda: ids() + 1000, ValueError, r"input_ids values must lie in \[0, 1000\)"),
    (lambda: ids() - 1000, ValueError, r"input_ids values must lie in \[0, 1000\)"),
    (lambda: ids(seq=40), ValueError, "longer than max_position_embeddings=32"),
    (lambda: ids().float(), TypeError, "input_ids must be an integer tensor"),
    # Integer dtypes torch's embedding lookup refuses: caught here, not inside torch.
    (lambda: ids().to(torch.int16), TypeError, "input_ids must be an integer tensor of int64"),
    (lambda: ids() > 500, TypeError, "input_ids must be an integer tensor of int64"),
    (lambda: ids()[0], ValueError, r"input_ids must be 2-D \(batch, seq\)"),
    (lambda: ids(batch=0), ValueError, "input_ids must hold at least one token"),
    (lambda: ids().tolist(), TypeError, "input_ids must be a torch.Tensor"),
])
def test_bad_input_ids(model, make, error, match):
    with pytest.raises(error, match=match):
        model(make())


def test_bad_attention_mask(model):
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(2, 8\)"):
        model(ids(), attention_mask=torch.ones(2, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must hold only 0"):
        model(ids(), attention_mask=torch.full((2, 8), 2))
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor"):
        model(ids(), attention_mask=[[1] * 8] * 2)


def test_bad_token_type_and_position_ids(model):
    with pytest.raises(ValueError, match=r"token_type_ids values must lie in \[0, 2\)"):
        model(ids(), token_type_ids=torch.full((2, 8), 2))
    with pytest.raises(TypeError, match="token_type_ids must be an integer tensor"):
        model(ids(), token_type_ids=torch.zeros(2, 8))
    with pytest.raises(ValueError, match=r"position_ids values must lie in \[0, 32\)"):
        model(ids(), position_ids=torch.arange(30, 38).expand(2, 8))
    with pytest.raises(ValueError, match="position_ids must have the shape of input_ids"):
        model(ids(), position_ids=torch.arange(8))
    with pytest.raises(TypeError, match="token_type_ids must be an integer tensor of int64"):
        model(ids(), token_type_ids=torch.zeros(2, 8, dtype=torch.uint8))


def test_token_type_and_position_ids_of_one_row_are_shared_by_the_batch(model):
    """transformers broadcasts (1, seq) token_type_ids / position_ids over the batch; they
    were refused here, so a model that ran stopped running once accelerated."""
    input_ids = ids()
    types, positions = torch.tensor([[0] * 4 + [1] * 4]), torch.arange(3, 11).unsqueeze(0)
    shared = model(input_ids, token_type_ids=types, position_ids=positions)
    expanded = model(input_ids, token_type_ids=types.expand(2, 8),
                     position_ids=positions.expand(2, 8))
    assert torch.equal(shared.last_hidden_state, expanded.last_hidden_state)


def test_bad_pretraining_targets(pretraining):
    x = ids()
    with pytest.raises(ValueError, match="labels must have the shape of input_ids"):
        pretraining(x, labels=torch.full((2, 7), -100))
    with pytest.raises(TypeError, match="labels must be int64"):
        pretraining(x, labels=torch.full((2, 8), -100, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"labels values must lie in \[0, 1000\)"):
        labels = torch.full((2, 8), -100)
        labels[0, 1] = 5000
        pretraining(x, labels=labels)
    with pytest.raises(ValueError, match=r"sbo_targets must have shape \(num_targets, 5\)"):
        pretraining(x, sbo_targets=torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="sbo_targets must be int64"):
        pretraining(x, sbo_targets=torch.zeros(3, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"sbo_targets\[:, 0\] \(row\) values must lie in \[0, 2\)"):
        pretraining(x, sbo_targets=torch.tensor([[2, 1, 4, 0, 7]]))
    with pytest.raises(ValueError, match=r"rel_pos\) values must lie in \[0, 15\)"):
        pretraining(x, sbo_targets=torch.tensor([[0, 0, 7, 15, 7]]))
    with pytest.raises(ValueError, match="strictly between its boundaries"):
        pretraining(x, sbo_targets=torch.tensor([[0, 1, 3, 1, 7]]))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    with pytest.raises(ValueError, match=r"sbo_targets\[:, 2\] \(right\) must be a real token"):
        pretraining(x, attention_mask=mask, sbo_targets=torch.tensor([[1, 1, 6, 0, 7]]))


def test_sbo_targets_are_checked_against_the_mask_not_a_length(pretraining):
    """The check was ``right < mask.sum(1)``: it refused valid spans of left-padded rows
    and accepted a left boundary on padding (which reads a zero hidden state)."""
    x = ids()
    left_padded = torch.ones(2, 8, dtype=torch.long)
    left_padded[1, :3] = 0
    span = torch.tensor([[1, 4, 7, 1, 7]])  # boundaries 4 and 7, target 6: all real tokens
    loss = pretraining(x, attention_mask=left_padded, sbo_targets=span).loss
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match=r"sbo_targets\[:, 1\] \(left\) must be a real token"):
        pretraining(x, attention_mask=left_padded, sbo_targets=torch.tensor([[1, 2, 6, 0, 7]]))
    gap = torch.ones(2, 8, dtype=torch.long)
    gap[0, 4] = 0
    with pytest.raises(ValueError, match=r"the target \(left \+ 1 \+ rel_pos\) must be a real"):
        pretraining(x, attention_mask=gap, sbo_targets=torch.tensor([[0, 2, 6, 1, 7]]))


def test_qa_answer_on_padding_is_an_error_not_an_inf_loss():
    qa = sf.SpanBertForQuestionAnswering(sf.SpanBertConfig.tiny(), backend="torch")
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    with pytest.raises(ValueError, match=r"end_positions\[1\] = 7 is a padded position"):
        qa(ids(), attention_mask=mask, start_positions=torch.tensor([1, 2]),
           end_positions=torch.tensor([3, 7]))
    # Outside [0, seq) is still ignored, as in transformers.
    loss = qa(ids(), attention_mask=mask, start_positions=torch.tensor([1, 2]),
              end_positions=torch.tensor([3, 8])).loss
    assert torch.isfinite(loss)


def test_bad_qa_positions():
    qa = sf.SpanBertForQuestionAnswering(sf.SpanBertConfig.tiny(), backend="torch")
    with pytest.raises(ValueError, match="start_positions and end_positions must be given together"):
        qa(ids(), start_positions=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"start_positions must have shape \(2,\)"):
        qa(ids(), start_positions=torch.tensor([1, 2, 3]), end_positions=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="end_positions must be an integer tensor"):
        qa(ids(), start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([1.0, 2.0]))


def test_bad_config_and_backend():
    with pytest.raises(ValueError, match="hidden_size .* divisible by num_attention_heads"):
        sf.SpanBertConfig(hidden_size=100, num_attention_heads=12)
    with pytest.raises(ValueError, match="hidden_act must be one of"):
        sf.SpanBertConfig(hidden_act="gelu_new")
    with pytest.raises(ValueError, match="position_embedding_type='relative_key'"):
        sf.SpanBertConfig.from_dict({"position_embedding_type": "relative_key"})
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        sf.SpanBertConfig(vocab_size=0)
    with pytest.raises(TypeError, match="config must be a SpanBertConfig"):
        sf.SpanBertModel({"hidden_size": 64})
    with pytest.raises(ValueError, match="backend must be one of"):
        sf.SpanBertModel(sf.SpanBertConfig.tiny(), backend="cuda")


def test_config_json_round_trip(tmp_path):
    config = sf.SpanBertConfig.large(extra={"architectures": ["BertForMaskedLM"]})
    config.to_json(tmp_path)
    again = sf.SpanBertConfig.from_json(tmp_path)
    assert again == config
    assert (again.hidden_size, again.num_hidden_layers, again.num_attention_heads) == (1024, 24, 16)
    assert again.vocab_size == 28996 and not again.add_pooling_layer
    assert sf.SpanBertConfig.base().hidden_size == 768
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertConfig.from_pretrained(tmp_path)
    assert (hf.hidden_size, hf.vocab_size, hf.layer_norm_eps) == (1024, 28996, 1e-12)
    with pytest.raises(FileNotFoundError, match="no config file"):
        sf.SpanBertConfig.from_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        sf.SpanBertConfig.from_json(tmp_path / "bad.json")


def test_config_key_typo_is_refused_naming_the_closest_field(tmp_path, capsys):
    """Issue 18.10: ``hiden_size`` in a config.json was kept as an unknown extra and a
    768-wide model was built. Every way a config.json is read must refuse it, suggest
    ``hidden_size``, and (for ``pretrain --config``) write nothing."""
    import json

    from spanbert_fast.train.commands import main

    values = sf.SpanBertConfig.tiny().to_dict()
    del values["hidden_size"]
    values["hiden_size"] = 64
    with pytest.raises(ValueError, match=r"'hiden_size' \(did you mean 'hidden_size'\?\)"):
        sf.SpanBertConfig.from_dict(values)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    with pytest.raises(ValueError, match=r"'hiden_size' \(did you mean 'hidden_size'\?\)"):
        sf.SpanBertConfig.from_json(path)
    sf.SpanBertModel(sf.SpanBertConfig.tiny()).save_pretrained(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text(json.dumps(values))
    with pytest.raises(ValueError, match=r"config.json.*'hiden_size' \(did you mean"):
        sf.SpanBertModel.from_pretrained(tmp_path / "model")

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("One sentence here.\nAnother one there.\n\nA second document.\n")
    out = tmp_path / "out"
    status = main(["pretrain", "--corpus", str(corpus), "--train-tokenizer", "60", "--config",
                   str(path), "--out", str(out), "--max-steps", "1", "--batch-size", "2",
                   "--quiet"])
    err = capsys.readouterr().err
    assert status == 2 and "'hiden_size' (did you mean 'hidden_size'?)" in err, err
    assert not out.exists(), "nothing may be written for a refused config"

    # strict=False keeps unknown keys (a transformers config object has accepted them).
    assert sf.SpanBertConfig.from_dict(values, strict=False).extra["hiden_size"] == 64


def test_config_keys_written_by_transformers_and_the_release_are_accepted(tmp_path):
    """The check must not refuse real configs: what transformers writes for BERT (every
    default key, plus a fine-tuned head's labels) and Google's original bert_config.json."""
    import json

    google = {"attention_probs_dropout_prob": 0.1, "directionality": "bidi",
              "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768,
              "initializer_range": 0.02, "intermediate_size": 3072,
              "max_position_embeddings": 512, "num_attention_heads": 12,
              "num_hidden_layers": 12, "pooler_fc_size": 768, "pooler_num_attention_heads": 12,
              "pooler_num_fc_layers": 3, "pooler_size_per_head": 128,
              "pooler_type": "first_token_transform", "type_vocab_size": 2, "vocab_size": 119547}
    assert sf.SpanBertConfig.from_dict(google).extra["pooler_type"] == "first_token_transform"
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(num_labels=3, finetuning_task="mnli",
                                     classifier_dropout=0.2)
    config.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert sf.SpanBertConfig.from_json(tmp_path).hidden_size == 768
    everything = {k: v for k, v in config.to_dict().items()}
    sf.SpanBertConfig.from_dict({**everything, **written})


def test_a_custom_config_key_is_kept_with_a_warning_and_our_own_save_loads(tmp_path):
    """transformers keeps a custom config key; refusing it (not a typo of any field) made a
    model that from_transformers/accelerate had built, once saved, unloadable by us."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=20, custom_flag=True))
    hf.save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="'custom_flag' is not read by spanbert_fast"):
        ours = sf.SpanBertModel.from_pretrained(tmp_path / "hf")
    assert ours.config.extra["custom_flag"] is True
    ours.save_pretrained(tmp_path / "ours")
    with pytest.warns(UserWarning, match="custom_flag"):
        again = sf.SpanBertModel.from_pretrained(tmp_path / "ours")
    assert again.config.extra["custom_flag"] is True and again.config.hidden_size == 16


def test_transformers_forward_options(model):
    """return_dict=False gives transformers' tuple; what the fused attention cannot give
    (attention maps, head masks) is refused by name instead of an unexpected-keyword error."""
    x = ids()
    out = model(x)
    as_tuple = model(x, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], out.last_hidden_state)
    assert len(as_tuple) == len(out.to_tuple())
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model(x, output_attentions=True)
    with pytest.raises(ValueError, match="head_mask is not supported"):
        model(x, head_mask=torch.ones(2, 2))
    qa = sf.SpanBertForQuestionAnswering(sf.SpanBertConfig.tiny(), backend="torch").eval()
    loss, start, end = qa(x, start_positions=torch.tensor([1, 2]),
                          end_positions=torch.tensor([3, 4]), return_dict=False)
    assert start.shape == end.shape == (2, 8) and loss.dim() == 0
