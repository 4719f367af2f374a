"""Checkpoint layer: every layout DESIGN.md lists loads with the same tensors, what we save
loads in transformers, and bad checkpoints fail with messages that name the problem."""

from __future__ import annotations

import argparse
import json
import logging
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

from spanbert_fast import (  # noqa: E402
    SpanBertConfig,
    SpanBertForPreTraining,
    SpanBertForQuestionAnswering,
    SpanBertModel,
)
from spanbert_fast import checkpoint  # noqa: E402
from spanbert_fast.checkpoint import CheckpointError  # noqa: E402

from parity import assert_close  # noqa: E402

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=64)
# fp32 CPU encoder of 2 layers: same math, different op order -> ~1e-7 relative.
HIDDEN_MAX_REL = 1e-5


def _randomize(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Fresh random values everywhere, so no LayerNorm weight is 1 and no bias 0 by accident."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():  # tied params are visited once
            param.copy_(torch.randn(param.shape, generator=gen) * 0.5 + 0.1)
    return model


def _hf(cls, **overrides):
    config = transformers.BertConfig(**{**SMALL, **overrides})
    return _randomize(cls(config)).eval()


def _ours(cls, seed: int = 2, **overrides):
    config = SpanBertConfig(**{**SMALL, **overrides})
    return _randomize(cls(config), seed).eval()


def _batch(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, SMALL["vocab_size"], (3, 11), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    types = torch.randint(0, 2, ids.shape, generator=gen)
    return ids, mask, types


def _assert_same_tensors(ours: dict, theirs: dict, keys=None) -> None:
    keys = sorted(theirs) if keys is None else keys
    for key in keys:
        assert key in ours, f"{key} missing from our state dict"
        assert torch.equal(ours[key], theirs[key]), f"{key} differs"


def _encoder_keys(state: dict, prefix: str) -> dict:
    """transformers' encoder tensors without the prefix and without buffers."""
    return {k[len(prefix):]: v for k, v in state.items()
            if k.startswith(prefix) and "position_ids" not in k and "token_type_ids" not in k}


def _assert_same_hidden(ours_encoder, hf_encoder) -> None:
    ids, mask, types = _batch()
    with torch.no_grad():
        got = ours_encoder(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        want = hf_encoder(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
    real = mask.bool()
    assert_close(got[real], want[real], max_rel=HIDDEN_MAX_REL, name="last_hidden_state")


def _rename_gamma_beta(state: dict) -> dict:
    out = {}
    for key, value in state.items():
        if "LayerNorm" in key or "layer_norm" in key:
            key = key.replace(".weight", ".gamma").replace(".bias", ".beta")
        out[key] = value
    return out


# ---------------------------------------------------------------------------------------
# transformers layouts
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_pooler", [True, False])
def test_bert_model_safetensors_loads_identically(tmp_path, with_pooler):
    hf = _hf(transformers.BertModel)
    if not with_pooler:
        hf = _randomize(transformers.BertModel(hf.config, add_pooling_layer=False)).eval()
    hf.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()

    ours = checkpoint.load_pretrained(SpanBertModel, tmp_path)
    assert not ours.training
    assert ours.config.add_pooling_layer is with_pooler  # inferred from the weights
    theirs = _encoder_keys(hf.state_dict(), "")
    assert set(ours.state_dict()) == set(theirs)
    _assert_same_tensors(ours.state_dict(), theirs)
    _assert_same_hidden(ours, hf)


def test_pytorch_bin_with_buffers_and_sharded_safetensors(tmp_path):
    hf = _hf(transformers.BertModel)
    state = dict(hf.state_dict())
    # older transformers saved these buffers; they must be ignored, not "unexpected"
    state["embeddings.position_ids"] = torch.arange(SMALL["max_position_embeddings"])[None]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(state, bin_dir / "pytorch_model.bin")
    hf.config.to_json_file(str(bin_dir / "config.json"))
    ours = checkpoint.load_pretrained(SpanBertModel, bin_dir)
    _assert_same_tensors(ours.state_dict(), _encoder_keys(hf.state_dict(), ""))

    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    loaded = checkpoint.read_state_dict(sharded)
    _assert_same_tensors(loaded, _encoder_keys(hf.state_dict(), ""))
    ours = checkpoint.load_pretrained(SpanBertModel, sharded)
    _assert_same_tensors(ours.state_dict(), _encoder_keys(hf.state_dict(), ""))


def test_question_answering_loads_identically(tmp_path):
    hf = _hf(transformers.BertForQuestionAnswering)
    hf.save_pretrained(tmp_path)
    ours = checkpoint.load_pretrained(SpanBertForQuestionAnswering, tmp_path)
    theirs = {k: v for k, v in hf.state_dict().items() if "position_ids" not in k}
    assert set(ours.state_dict()) == set(theirs)
    _assert_same_tensors(ours.state_dict(), theirs)
    _assert_same_hidden(ours.bert, hf.bert)


def test_pretraining_checkpoint_into_each_kind(tmp_path, caplog):
    hf = _hf(transformers.BertForPreTraining)
    hf.save_pretrained(tmp_path)  # transformers leaves the tied decoder weight out
    theirs = hf.state_dict()

    # Into the bare encoder: the heads and NSP are ignored with an info log, not an error.
    with caplog.at_level(logging.INFO, logger="spanbert_fast.checkpoint"):
        encoder = checkpoint.load_pretrained(SpanBertModel, tmp_path)
    assert "cls.seq_relationship.weight" in caplog.text
    assert "cls.predictions.transform.dense.weight" in caplog.text
    _assert_same_tensors(encoder.state_dict(), _encoder_keys(theirs, "bert."))

    # Into the pretraining model: the SBO head is missing -> error unless strict=False.
    with pytest.raises(CheckpointError, match=r"cls\.pair_target_predictions\.position_embeddings"):
        checkpoint.load_pretrained(SpanBertForPreTraining, tmp_path)
    with pytest.warns(UserWarning, match="missing keys"):
        model = checkpoint.load_pretrained(SpanBertForPreTraining, tmp_path, strict=False)
    state = model.state_dict()
    mlm = [k for k in theirs if k.startswith("cls.predictions.") and k != "cls.predictions.decoder.bias"]
    _assert_same_tensors(state, theirs, keys=[k for k in theirs if k.startswith("bert.")
                                              and "pooler" not in k] + mlm)
    word = model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight is word
    assert model.cls.pair_target_predictions.decoder.weight is word


def test_untied_decoder_that_differs_is_refused():
    model = _ours(SpanBertForPreTraining)
    state = dict(model.state_dict())
    state["cls.predictions.decoder.weight"] = state["cls.predictions.decoder.weight"] + 1.0
    with pytest.raises(CheckpointError, match="differs from the word embeddings"):
        checkpoint.load_into(_ours(SpanBertForPreTraining, seed=5), state)


# ---------------------------------------------------------------------------------------
# Original SpanBERT release and the fairseq checkpoint with heads
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bert_prefix", [True, False])
def test_original_release_gamma_beta(tmp_path, bert_prefix):
    source = _ours(SpanBertModel)  # released configs have no pooler
    state = {("bert." + k if bert_prefix else k): v for k, v in source.state_dict().items()}
    release = _rename_gamma_beta(state)
    assert any(k.endswith("LayerNorm.gamma") for k in release)
    torch.save(release, tmp_path / "pytorch_model.bin")
    # the release's bert_config.json: BERT keys only, no model_type
    (tmp_path / "bert_config.json").write_text(json.dumps(
        {k: v for k, v in source.config.to_dict().items()
         if k not in ("model_type", "add_pooling_layer", "sbo_max_targets",
                      "sbo_position_embedding_size", "position_embedding_type")}))

    encoder = checkpoint.load_pretrained(SpanBertModel, tmp_path)
    _assert_same_tensors(encoder.state_dict(), source.state_dict())
    with pytest.warns(UserWarning, match=r"qa_outputs\.weight"):  # the release has no QA head
        qa = checkpoint.load_pretrained(SpanBertForQuestionAnswering, tmp_path, strict=False)
    _assert_same_tensors(qa.state_dict(), {"bert." + k: v for k, v in source.state_dict().items()})
    assert not checkpoint.load_pretrained(SpanBertModel, tmp_path).config.add_pooling_layer


def test_fairseq_checkpoint_with_heads_and_20_row_table(tmp_path):
    source = _ours(SpanBertForPreTraining, sbo_max_targets=20)
    state = {k: v for k, v in source.state_dict().items()}
    fairseq = {"decoder." + k: v for k, v in _rename_gamma_beta(state).items()}
    assert "decoder.cls.pair_target_predictions.mlp_layer_norm.layer_norm1.gamma" in fairseq
    assert fairseq["decoder.cls.pair_target_predictions.position_embeddings.weight"].shape[0] == 20
    path = tmp_path / "checkpoint_best.pt"
    torch.save({"model": fairseq, "args": argparse.Namespace(lr=1e-4, arch="bert_hf"),
                "optimizer_history": [{"num_updates": 3}]}, path)
    # the config.json says 15 rows (the release default); the tensor says 20 and wins
    SpanBertConfig(**SMALL).to_json(str(tmp_path / "config.json"))

    model = checkpoint.load_pretrained(SpanBertForPreTraining, path)
    assert model.config.sbo_max_targets == 20
    _assert_same_tensors(model.state_dict(), state)
    assert model.cls.pair_target_predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight

    from_dir = checkpoint.load_pretrained(SpanBertForPreTraining, tmp_path)  # finds checkpoint_best.pt
    _assert_same_tensors(from_dir.state_dict(), state)
    encoder = checkpoint.load_pretrained(SpanBertModel, tmp_path)  # heads ignored
    _assert_same_tensors(encoder.state_dict(), _encoder_keys(state, "bert."))


_FAIRSEQ_LIKE_MODULE = """
import shutil


class BertConfig:
    \"\"\"Stands in for fairseq.models.pair_bert.BertConfig: a plain object with fields.\"\"\"

    def __init__(self, hidden_size):
        self.hidden_size = hidden_size


class Canary:
    \"\"\"Unpickling it for real would copy `source` to `path`: it must never happen.\"\"\"

    def __init__(self, source, path):
        self.source, self.path = source, path

    def __reduce__(self):
        return (shutil.copyfile, (self.source, self.path))
"""


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_release_checkpoint_pickling_a_foreign_config_class_reads_safely(tmp_path, zip_format):
    """The original release with heads (``model.pt`` of the fairseq fork) is a dict
    ``{"model": state dict, "args": Namespace(...), ...}`` whose ``args`` hold an object of
    ``fairseq.models.pair_bert.BertConfig``, a class that does not exist where the file is
    read. The weights are ``state["model"]``; the rest is never needed. The file must be
    read without ``weights_only=False`` and without running anything it pickles: each
    foreign class becomes an inert stub, named in one warning. Old code: "corrupt,
    truncated, or holding objects other than tensors"."""
    import importlib
    import sys

    package = tmp_path / "module_root" / "fakeseq_i17"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "pair_bert.py").write_text(_FAIRSEQ_LIKE_MODULE)
    canary = tmp_path / "canary"
    sys.path.insert(0, str(tmp_path / "module_root"))
    try:
        pair_bert = importlib.import_module("fakeseq_i17.pair_bert")
        source = _ours(SpanBertForPreTraining)
        state = dict(source.state_dict())
        fairseq = {"decoder." + k: v for k, v in _rename_gamma_beta(state).items()}
        path = tmp_path / "model.pt"
        torch.save({"model": fairseq,
                    "args": argparse.Namespace(arch="cased_bert_pair_large",
                                               bert_config=pair_bert.BertConfig(32),
                                               hook=pair_bert.Canary(__file__, str(canary))),
                    "optimizer_history": [{"num_updates": 3}]},
                   path, _use_new_zipfile_serialization=zip_format)
    finally:
        sys.path.remove(str(tmp_path / "module_root"))
        for name in ("fakeseq_i17.pair_bert", "fakeseq_i17"):
            sys.modules.pop(name, None)
    assert not canary.exists()
    with pytest.raises(ImportError):
        importlib.import_module("fakeseq_i17.pair_bert")

    with pytest.warns(UserWarning) as caught:
        tensors = checkpoint.read_state_dict(path)
    lines = [str(w.message) for w in caught if "stubbed" in str(w.message)]
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "fakeseq_i17.pair_bert.BertConfig" in lines[0]
    assert "shutil.copyfile" in lines[0]  # the canary's reducer was stubbed, not called
    assert not canary.exists()
    assert set(tensors) == set(fairseq)
    SpanBertConfig(**SMALL).to_json(str(tmp_path / "config.json"))
    with pytest.warns(UserWarning, match="stubbed"):
        model = checkpoint.load_pretrained(SpanBertForPreTraining, path)
    _assert_same_tensors(model.state_dict(), state)
    assert not canary.exists()
    assert "fakeseq_i17" not in sys.modules


def test_convert_state_dict_names():
    tensor = torch.randn(3)
    state = {
        "decoder.bert.embeddings.LayerNorm.gamma": tensor,
        "decoder.bert.encoder.layer.0.output.LayerNorm.beta": tensor,
        "decoder.bert.pooler.dense.weight": tensor,
        "decoder.cls.predictions.bias": tensor,
        "decoder.cls.seq_relationship.weight": tensor,
        "qa_outputs.weight": tensor,
        "bert.embeddings.position_ids": tensor,
        "something.else": tensor,
    }
    config = SpanBertConfig(**SMALL)
    converted, ignored = checkpoint.convert_state_dict(state, "model", config)
    assert sorted(converted) == ["embeddings.LayerNorm.weight",
                                 "encoder.layer.0.output.LayerNorm.bias", "something.else"]
    assert set(ignored) == {"bert.pooler.dense.weight", "cls.predictions.bias",
                            "cls.seq_relationship.weight", "qa_outputs.weight",
                            "bert.embeddings.position_ids"}
    converted, _ = checkpoint.convert_state_dict(state, "pretraining",
                                                 config.replace(add_pooling_layer=True))
    assert {"bert.pooler.dense.weight", "cls.predictions.bias",
            "bert.embeddings.LayerNorm.weight"} <= set(converted)
    assert "cls.seq_relationship.weight" not in converted
    converted, _ = checkpoint.convert_state_dict(state, "qa", config.replace(add_pooling_layer=True))
    assert "qa_outputs.weight" in converted and "bert.pooler.dense.weight" not in converted
    with pytest.raises(ValueError, match="kind"):
        checkpoint.convert_state_dict(state, "mlm", config)


# ---------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [SpanBertModel, SpanBertForPreTraining, SpanBertForQuestionAnswering])
def test_save_then_load_is_identical(tmp_path, cls):
    source = _ours(cls, add_pooling_layer=cls is SpanBertModel)
    checkpoint.save_pretrained(source, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [checkpoint.ARCHITECTURES[cls.checkpoint_kind]]
    loaded = checkpoint.load_pretrained(cls, tmp_path)
    assert loaded.config == source.config
    want, got = source.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    _assert_same_tensors(got, want)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]

    checkpoint.save_pretrained(source, tmp_path, safe_serialization=False)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "pytorch_model.bin"]  # stale file gone
    _assert_same_tensors(checkpoint.load_pretrained(cls, tmp_path).state_dict(), want)


@pytest.mark.parametrize("pooler", [True, False])
def test_transformers_reads_what_we_save(tmp_path, pooler):
    source = _ours(SpanBertModel, add_pooling_layer=pooler)
    checkpoint.save_pretrained(source, tmp_path)
    # transformers' BertModel always builds a pooler from a config.json (a fresh one when
    # the file has none, as with the original SpanBERT release); every tensor we wrote matches.
    hf = transformers.BertModel.from_pretrained(tmp_path).eval()
    theirs = _encoder_keys(hf.state_dict(), "")
    assert set(source.state_dict()) <= set(theirs)
    _assert_same_tensors(theirs, source.state_dict())
    _assert_same_hidden(source, hf)


def test_transformers_reads_our_qa_and_pretraining(tmp_path):
    qa = _ours(SpanBertForQuestionAnswering)
    checkpoint.save_pretrained(qa, tmp_path / "qa")
    hf_qa = transformers.BertForQuestionAnswering.from_pretrained(tmp_path / "qa")
    _assert_same_tensors(hf_qa.state_dict(), qa.state_dict())

    pre = _ours(SpanBertForPreTraining)
    checkpoint.save_pretrained(pre, tmp_path / "pre")
    hf_pre = transformers.BertForPreTraining.from_pretrained(tmp_path / "pre")  # NSP missing: fine
    mlm = [k for k in pre.state_dict() if k.startswith(("bert.", "cls.predictions."))]
    _assert_same_tensors(hf_pre.state_dict(), pre.state_dict(), keys=mlm)
    assert torch.equal(hf_pre.cls.predictions.decoder.weight, pre.bert.embeddings.word_embeddings.weight)


# ---------------------------------------------------------------------------------------
# from_transformers
# ---------------------------------------------------------------------------------------
def test_from_transformers_copies_weights_and_mode():
    hf = _hf(transformers.BertModel)
    ours = checkpoint.from_transformers(SpanBertModel, hf)
    assert ours.config.add_pooling_layer and not ours.training
    _assert_same_tensors(ours.state_dict(), _encoder_keys(hf.state_dict(), ""))
    _assert_same_hidden(ours, hf)

    hf_qa = _hf(transformers.BertForQuestionAnswering).train()
    qa = checkpoint.from_transformers(SpanBertForQuestionAnswering, hf_qa)
    assert qa.training
    _assert_same_tensors(qa.state_dict(), {k: v for k, v in hf_qa.state_dict().items()})

    hf_pre = _hf(transformers.BertForPreTraining)
    pre = checkpoint.from_transformers(SpanBertForPreTraining, hf_pre)  # SBO head stays fresh
    keys = [k for k in pre.state_dict() if k.startswith(("bert.", "cls.predictions."))]
    _assert_same_tensors(pre.state_dict(), hf_pre.state_dict(), keys=keys)


@pytest.mark.parametrize("overrides, match", [
    (dict(is_decoder=True), "is_decoder"),
    (dict(position_embedding_type="relative_key"), "position_embedding_type"),
    (dict(hidden_act="gelu_new"), "hidden_act"),
])
def test_from_transformers_refuses_unrepresentable(overrides, match):
    hf = transformers.BertModel(transformers.BertConfig(**SMALL))
    for key, value in overrides.items():
        setattr(hf.config, key, value)
    with pytest.raises(ValueError, match=match):
        checkpoint.from_transformers(SpanBertModel, hf)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------
def _encoder_state():
    return dict(_ours(SpanBertModel).state_dict())


def test_missing_key_is_named():
    state = _encoder_state()
    del state["encoder.layer.1.output.dense.bias"]
    with pytest.raises(CheckpointError, match=r"missing keys.*\n.*encoder\.layer\.1\.output\.dense\.bias"):
        checkpoint.load_into(_ours(SpanBertModel, seed=7), state)


def test_unexpected_key_is_named():
    state = _encoder_state()
    state["encoder.layer.2.output.dense.bias"] = torch.randn(32)
    with pytest.raises(CheckpointError, match=r"unexpected keys.*\n.*encoder\.layer\.2\.output\.dense\.bias"):
        checkpoint.load_into(_ours(SpanBertModel, seed=7), state)


def test_misshaped_key_names_both_shapes():
    state = _encoder_state()
    state["embeddings.word_embeddings.weight"] = torch.randn(99, 32)
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_into(_ours(SpanBertModel, seed=7), state)
    message = str(info.value)
    assert "embeddings.word_embeddings.weight: model expects (100, 32), checkpoint has (99, 32)" in message
    assert info.value.mismatched == [("embeddings.word_embeddings.weight", (100, 32), (99, 32))]


def test_strict_false_warns_and_loads_the_rest():
    state = _encoder_state()
    del state["encoder.layer.1.output.dense.bias"]
    state["embeddings.word_embeddings.weight"] = torch.randn(99, 32)
    state["not.a.key"] = torch.randn(2)
    target = _ours(SpanBertModel, seed=7)
    kept_bias = target.encoder.layer[1].output.dense.bias.detach().clone()
    kept_words = target.embeddings.word_embeddings.weight.detach().clone()
    with pytest.warns(UserWarning) as record:
        checkpoint.load_into(target, state, strict=False)
    message = "\n".join(str(w.message) for w in record)
    for name in ("encoder.layer.1.output.dense.bias", "not.a.key", "(99, 32)"):
        assert name in message
    got = target.state_dict()
    assert torch.equal(got["encoder.layer.1.output.dense.bias"], kept_bias)
    assert torch.equal(got["embeddings.word_embeddings.weight"], kept_words)
    _assert_same_tensors(got, state, keys=[k for k in state if k not in (
        "embeddings.word_embeddings.weight", "not.a.key")])


def test_long_key_lists_are_truncated():
    with pytest.raises(CheckpointError) as info:
        checkpoint.load_into(_ours(SpanBertModel), {f"junk.{i}": torch.zeros(1) for i in range(45)})
    message = str(info.value)
    assert "unexpected keys (in the checkpoint, not in the model) (45)" in message
    assert "... and 25 more" in message
    assert len(message) < 8000


def test_missing_paths(tmp_path):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        checkpoint.read_state_dict(nowhere)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        checkpoint.load_pretrained(SpanBertModel, nowhere)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors.*pytorch_model.bin"):
        checkpoint.read_state_dict(empty)
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint.read_config(empty)


def test_corrupt_and_truncated_files_name_the_file(tmp_path):
    gen = torch.Generator().manual_seed(0)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "model.safetensors").write_bytes(
        bytes(torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).tolist()))
    with pytest.raises(CheckpointError, match=r"corrupt[/\\]model\.safetensors"):
        checkpoint.read_state_dict(corrupt)

    truncated = tmp_path / "truncated"
    truncated.mkdir()
    torch.save(_encoder_state(), truncated / "pytorch_model.bin")
    data = (truncated / "pytorch_model.bin").read_bytes()
    (truncated / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated[/\\]pytorch_model\.bin"):
        checkpoint.read_state_dict(truncated)

    # a safetensors file cut short
    whole = tmp_path / "whole"
    checkpoint.save_pretrained(_ours(SpanBertModel), whole)
    data = (whole / "model.safetensors").read_bytes()
    (whole / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"whole[/\\]model\.safetensors"):
        checkpoint.load_pretrained(SpanBertModel, whole)


def test_missing_shard_is_named(tmp_path):
    hf = _hf(transformers.BertModel)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(FileNotFoundError, match=shard):
        checkpoint.read_state_dict(tmp_path)


def test_save_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    first = _ours(SpanBertModel, seed=2)
    checkpoint.save_pretrained(first, tmp_path)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def fail_mid_write(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail_mid_write)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_pretrained(_ours(SpanBertModel, seed=9), tmp_path)
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert after == before  # previous files intact, no temporary file left
    monkeypatch.undo()
    _assert_same_tensors(checkpoint.load_pretrained(SpanBertModel, tmp_path).state_dict(),
                         first.state_dict())


@pytest.mark.parametrize("safe", [True, False])
def test_failure_writing_config_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch, safe):
    """A failure while config.json is being written (ENOSPC, Ctrl-C) must not leave the new
    weights beside the old config: the directory still loads the first model exactly."""
    import builtins
    import errno

    first = _ours(SpanBertModel, seed=2)
    checkpoint.save_pretrained(first, tmp_path, safe_serialization=safe)
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    real_open = builtins.open

    def failing_open(file, mode="r", *args, **kwargs):
        if "w" in mode and "config.json" in os.path.basename(str(file)):
            raise OSError(errno.ENOSPC, "No space left on device (simulated)")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", failing_open)
    # A different vocabulary, so new weights beside the old config would not even load.
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_pretrained(_ours(SpanBertModel, seed=9, vocab_size=120), tmp_path,
                                   safe_serialization=safe)
    monkeypatch.undo()
    after = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}
    assert after == before  # previous files intact, no temporary file left
    _assert_same_tensors(checkpoint.load_pretrained(SpanBertModel, tmp_path).state_dict(),
                         first.state_dict())


def test_save_creates_nested_directory_and_refuses_a_file(tmp_path):
    target = tmp_path / "a" / "b"
    checkpoint.save_pretrained(_ours(SpanBertModel), target)
    assert (target / "model.safetensors").exists()
    with pytest.raises(NotADirectoryError):
        checkpoint.save_pretrained(_ours(SpanBertModel), target / "model.safetensors")


def test_saved_files_get_ordinary_permissions(tmp_path):
    """Atomic writes go through mkstemp (mode 0600); the final files must get the mode a
    plain open() gives them, or another user of a shared checkpoint directory cannot read it."""
    model = SpanBertModel(SpanBertConfig.tiny(), backend="torch")
    model.save_pretrained(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name


def test_atomic_write_writes_into_a_device_or_pipe_instead_of_replacing_it(tmp_path):
    """``--json /dev/null`` and the like: a target that exists and is not a regular file
    is written to, never renamed over (that would turn /dev/null into a file)."""
    import stat

    from spanbert_fast.io import atomic_write

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    seen = []
    atomic_write(str(fifo), lambda path: seen.append(path))
    assert seen == [str(fifo)]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    regular = tmp_path / "file.txt"
    atomic_write(str(regular), lambda path: open(path, "w").write("x"))
    assert regular.read_text() == "x"
