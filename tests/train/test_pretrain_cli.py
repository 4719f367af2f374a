"""`spanbert-fast pretrain`: the loss goes down, checkpoints resume exactly, writes are
atomic, bad input gives one error line; plus the corpus packing, tokenizer and schedule
pieces it is built from."""

from __future__ import annotations

import json
import math
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from spanbert_fast import SpanBertConfig, SpanBertForPreTraining
from spanbert_fast.train.commands import main
from spanbert_fast.train.corpus import BlockOrder, CorpusText, pack_corpus, read_corpus
from spanbert_fast.train.input_files import InputError
from spanbert_fast.train.pretraining import (LOG_FILE, PretrainOptions, find_checkpoint,
                                       run_pretraining)
from spanbert_fast.train.tokenization import load_tokenizer, train_tokenizer
from spanbert_fast.train.training import adamw_parameter_groups, warmup_then_decay
from data_files import DATA, CORPUS, VOCAB  # noqa: E402
from parity import one_cli_error_line  # noqa: E402


# One intra-op thread for this module's tiny models (tests/conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _read_log(out: str):
    with open(os.path.join(out, LOG_FILE), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


# ---------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("pretrain") / "out")
    status = main(["pretrain", "--corpus", CORPUS, "--vocab", VOCAB, "--config", "tiny",
                   "--seq-len", "64", "--batch-size", "8", "--max-steps", "200", "--lr", "5e-3",
                   "--warmup-steps", "10", "--save-every", "100", "--keep-checkpoints", "1",
                   "--out", out, "--quiet"])
    assert status == 0
    return out


def test_pretraining_drives_the_loss_down(pretrained):
    log = _read_log(pretrained)
    assert [r["step"] for r in log] == list(range(1, 201))
    first = {k: np.mean([r[k] for r in log[:10]]) for k in ("loss", "mlm_loss", "sbo_loss")}
    last = {k: np.mean([r[k] for r in log[-10:]]) for k in ("loss", "mlm_loss", "sbo_loss")}
    # Measured (seeds 0, 1, 2): last/first = 0.77, 0.76, 0.77; the first steps sit at
    # 2 ln(400) = 12.0 (uniform guesses over the 400-token vocabulary).
    assert last["loss"] < 0.85 * first["loss"], (first, last)
    assert last["mlm_loss"] < 0.9 * first["mlm_loss"] and last["sbo_loss"] < 0.9 * first["sbo_loss"]
    # Below what unigram frequencies alone reach (2 x the corpus's unigram entropy, 10.6
    # nats; measured 9.05): the model uses the context.
    tokenizer = load_tokenizer(VOCAB)
    counts = np.bincount(pack_corpus(read_corpus(CORPUS), tokenizer, 62).tokens,
                         minlength=tokenizer.vocab_size)
    p = counts[counts > 0] / counts.sum()
    assert last["loss"] < 2 * float(-(p * np.log(p)).sum())


def test_pretrain_output_layout(pretrained):
    names = set(os.listdir(pretrained))
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt",
            "tokenizer_config.json", LOG_FILE, "checkpoint-200"} <= names
    assert not [n for n in names if n.startswith(".")]  # no temporary directory left
    assert "checkpoint-100" not in names  # --keep-checkpoints 1
    checkpoint = os.path.join(pretrained, "checkpoint-200")
    assert {"training_state.pt", "rng_state_rank0.pt", "model.safetensors",
            "tokenizer.json"} <= set(os.listdir(checkpoint))
    assert find_checkpoint(pretrained) == checkpoint
    final = load_file(os.path.join(pretrained, "model.safetensors"))
    saved = load_file(os.path.join(checkpoint, "model.safetensors"))
    assert final.keys() == saved.keys() and all(torch.equal(final[k], saved[k]) for k in final)
    model = SpanBertForPreTraining.from_pretrained(pretrained)
    assert model.config.vocab_size == load_tokenizer(VOCAB).vocab_size == 400


def test_saved_tokenizer_reads_in_transformers(pretrained):
    transformers = pytest.importorskip("transformers")
    ours = load_tokenizer(pretrained)
    theirs = transformers.AutoTokenizer.from_pretrained(pretrained)
    text = "The keeper climbed one hundred and twelve steps to Elmsworth's lamp."
    assert theirs(text)["input_ids"] == [ours.cls_id] + ours.encode_batch([text])[0] + [ours.sep_id]


def test_pretrain_prints_progress_and_log_lines(tmp_path, capsys):
    out = str(tmp_path / "out")
    assert main(["pretrain", "--corpus", CORPUS, "--vocab", VOCAB, "--config", "tiny",
                 "--seq-len", "32", "--batch-size", "4", "--max-steps", "3", "--log-every", "1",
                 "--out", out]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith("corpus: 1 file(s), 10 documents")
    assert lines[1].startswith("model: 2 layers, hidden 64")
    assert [line.split()[:2] for line in lines[2:5]] == [["step", "1/3"], ["step", "2/3"],
                                                        ["step", "3/3"]]
    assert all(" mlm " in line and " sbo " in line and "tok/s" in line for line in lines[2:5])
    assert "pretrain" in captured.err and "tok/s" in captured.err  # the tqdm bar


def test_pretrain_trains_a_cased_wordpiece_tokenizer(tmp_path):
    out = str(tmp_path / "out")
    result = run_pretraining(PretrainOptions(
        corpus=CORPUS, out=out, max_steps=2, train_tokenizer=300, config="tiny", seq_len=32,
        batch_size=2, progress=False))
    assert len(result.history) == 2
    tokenizer = load_tokenizer(out)
    assert tokenizer.vocab_size <= 300 and not tokenizer.lowercase
    vocab = tokenizer.backend.get_vocab()
    assert "The" in vocab and "[MASK]" in vocab
    continuation = tokenizer.is_continuation()
    assert continuation.any()
    assert all(continuation[i] == tok.startswith("##") for tok, i in vocab.items() if tok != "##")
    assert SpanBertForPreTraining.from_pretrained(out).config.vocab_size == tokenizer.vocab_size


def _resume_options(out: str, **changes) -> PretrainOptions:
    # Default tiny config: dropout on, so the RNG states must be restored too.
    values = dict(corpus=CORPUS, out=out, vocab=VOCAB, config="tiny", seq_len=64, batch_size=4,
                  grad_accum_steps=2, max_steps=12, lr=5e-3, warmup_steps=3, save_every=4,
                  progress=False, seed=3)
    values.update(changes)
    return PretrainOptions(**values)


class _Killed(Exception):
    pass


def test_resume_continues_exactly(tmp_path):
    straight = run_pretraining(_resume_options(str(tmp_path / "straight")))

    out = str(tmp_path / "killed")

    def kill_after_step_10(step, record):
        if step == 10:
            raise _Killed()

    with pytest.raises(_Killed):
        run_pretraining(_resume_options(out), step_callback=kill_after_step_10)
    assert find_checkpoint(out).endswith("checkpoint-8")  # steps 9 and 10 are lost
    assert [r["step"] for r in _read_log(out)] == list(range(1, 11))

    assert main(["pretrain", "--corpus", CORPUS, "--vocab", VOCAB, "--config", "tiny",
                 "--seq-len", "64", "--batch-size", "4", "--grad-accum-steps", "2",
                 "--max-steps", "12", "--lr", "5e-3", "--warmup-steps", "3", "--save-every", "4",
                 "--seed", "3", "--out", out, "--resume", out, "--quiet"]) == 0
    log = _read_log(out)
    assert [r["step"] for r in log] == list(range(1, 13))
    for ours, reference in zip(log, straight.history):
        for key in ("loss", "mlm_loss", "sbo_loss", "lr", "grad_norm", "mlm_targets"):
            assert ours[key] == reference[key], (ours["step"], key)  # bit for bit
    resumed = load_file(os.path.join(out, "model.safetensors"))
    reference = load_file(os.path.join(tmp_path / "straight", "model.safetensors"))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    original = SpanBertForPreTraining.save_pretrained

    def fail_at_step_4(self, path):
        if "checkpoint-4" in str(path):
            raise OSError(28, "No space left on device")
        original(self, path)

    monkeypatch.setattr(SpanBertForPreTraining, "save_pretrained", fail_at_step_4)
    # --seq-len 64: no line of the corpus is longer than a block (no warning line).
    args = ["pretrain", "--corpus", CORPUS, "--vocab", VOCAB, "--config", "tiny", "--seq-len",
            "64", "--batch-size", "2", "--max-steps", "4", "--save-every", "2", "--out", out,
            "--quiet"]
    assert main(args) == 1
    assert "No space left on device" in one_cli_error_line(capsys)
    assert find_checkpoint(out).endswith("checkpoint-2")
    assert not os.path.exists(os.path.join(out, "checkpoint-4"))
    monkeypatch.setattr(SpanBertForPreTraining, "save_pretrained", original)
    assert main(args + ["--resume", out]) == 0
    assert find_checkpoint(out).endswith("checkpoint-4")
    assert not [n for n in os.listdir(out) if n.startswith(".")]


# ---------------------------------------------------------------------------- bad input
def _write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("case", [
    "missing corpus", "empty corpus file", "empty corpus directory", "non-UTF-8 corpus",
    "vocab without [MASK]", "non-UTF-8 vocab", "no vocabulary", "seq-len too long",
    "missing config", "config not JSON", "batch not divisible", "missing resume",
    "bf16 on CPU", "tiny tokenizer", "out holds another run",
    # Optimiser options that reached torch (a traceback) or a crash mid-run before:
    "negative lr decay power", "beta1 of 1.5", "negative adam eps", "lr nan",
    "warmup past max steps", "cased tokenizer.json with --lowercase",
])
def test_pretrain_bad_input_givesone_cli_error_line(tmp_path, capsys, case):
    corpus, vocab, extra = CORPUS, ["--vocab", VOCAB], []
    expected = {
        "missing corpus": "does not exist", "empty corpus file": "is empty",
        "empty corpus directory": "holds no files",
        "non-UTF-8 corpus": "is not valid UTF-8: byte 0xff at offset 16 (line 2)",
        "vocab without [MASK]": "lacks the special token [MASK]",
        "non-UTF-8 vocab": "is not valid UTF-8", "no vocabulary": "give exactly one of --vocab",
        "seq-len too long": "--seq-len must be in [3, 128]", "missing config": "--config must be",
        "config not JSON": "is not valid JSON", "batch not divisible": "must be a multiple",
        "missing resume": "--resume", "bf16 on CPU": "needs a CUDA device",
        "tiny tokenizer": "--train-tokenizer needs a vocabulary size above 5",
        "out holds another run": "already holds checkpoints of another run",
        "negative lr decay power": "--lr-decay-power must be in [0.0, 100.0]",
        "beta1 of 1.5": "--adam-betas must be in [0.0, 1.0)",
        "negative adam eps": "--adam-eps must be in [0.0, 1.0]",
        "lr nan": "--lr must be positive, got nan",
        "warmup past max steps": "--warmup-steps must be in [0, --max-steps=1]",
        "cased tokenizer.json with --lowercase": "--lowercase was given but --vocab",
    }[case]
    if case == "missing corpus":
        corpus = str(tmp_path / "nowhere.txt")
    elif case == "empty corpus file":
        corpus = _write(tmp_path / "empty.txt", b"")
    elif case == "empty corpus directory":
        os.makedirs(tmp_path / "texts")
        corpus = str(tmp_path / "texts")
    elif case == "non-UTF-8 corpus":
        corpus = _write(tmp_path / "latin1.txt", b"The first line.\n\xff caf\xe9\n")
    elif case == "vocab without [MASK]":
        vocab = ["--vocab", _write(tmp_path / "vocab.txt",
                                   b"[PAD]\n[UNK]\n[CLS]\n[SEP]\nthe\n##s\n")]
    elif case == "non-UTF-8 vocab":
        vocab = ["--vocab", _write(tmp_path / "vocab.txt", b"[PAD]\n\xfe\xff\n")]
    elif case == "no vocabulary":
        vocab = []
    elif case == "seq-len too long":
        extra = ["--seq-len", "1000"]
    elif case == "missing config":
        extra = ["--config", str(tmp_path / "nope.json")]
    elif case == "config not JSON":
        extra = ["--config", _write(tmp_path / "config.json", b"{not json")]
    elif case == "batch not divisible":
        extra = ["--batch-size", "3", "--grad-accum-steps", "2"]
    elif case == "missing resume":
        extra = ["--resume", str(tmp_path / "no_checkpoints")]
    elif case == "bf16 on CPU":
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        extra = ["--precision", "bf16", "--device", "cpu"]
    elif case == "tiny tokenizer":
        vocab = ["--train-tokenizer", "3"]
    elif case == "negative lr decay power":
        extra = ["--lr-decay-power", "-1"]
    elif case == "beta1 of 1.5":
        extra = ["--adam-betas", "1.5", "0.9"]
    elif case == "negative adam eps":
        extra = ["--adam-eps", "-1"]
    elif case == "lr nan":
        extra = ["--lr", "nan"]
    elif case == "warmup past max steps":
        extra = ["--warmup-steps", "50"]
    elif case == "cased tokenizer.json with --lowercase":
        load_tokenizer(VOCAB).save(str(tmp_path / "cased"))
        vocab = ["--vocab", str(tmp_path / "cased" / "tokenizer.json")]
        extra = ["--lowercase"]
    elif case == "out holds another run":
        os.makedirs(tmp_path / "out" / "checkpoint-7")
        (tmp_path / "out" / "checkpoint-7" / "training_state.pt").write_bytes(b"")
    args = ["pretrain", "--corpus", corpus, *vocab, "--out", str(tmp_path / "out"),
            "--max-steps", "1", "--batch-size", "2", "--quiet"]
    if "--config" not in extra:
        args += ["--config", "tiny"]
    assert main(args + extra) == 2
    assert expected in one_cli_error_line(capsys)


# ---------------------------------------------------------------------------- the pieces
class _CharTokenizer:
    """One id per character (a stand-in: packing only calls encode_batch)."""

    def encode_batch(self, texts):
        return [[ord(c) for c in text if c != " "] for text in texts]


def test_packing_keeps_documents_apart_and_lines_whole():
    corpus = CorpusText(["x"], [["ab", "cde", "fgh"], ["ijklmnopq"], ["r"]])
    blocks = pack_corpus(corpus, _CharTokenizer(), block_len=4, long_lines="cut")
    texts = ["".join(chr(i) for i in blocks.block(b)) for b in range(len(blocks))]
    # "ab"+"cde" > 4: new block; "fgh" alone; with long_lines="cut" a 9-char line is cut
    # into 4 + 4 + 1; the next document starts a new block.
    assert texts == ["ab", "cde", "fgh", "ijkl", "mnop", "q", "r"]
    assert blocks.num_tokens == 18 and blocks.tokens.dtype == np.int32
    # By default (the original's rule) the 9-char line is dropped instead, and counted.
    dropped = pack_corpus(corpus, _CharTokenizer(), block_len=4)
    assert ["".join(chr(i) for i in dropped.block(b)) for b in range(len(dropped))] == [
        "ab", "cde", "fgh", "r"]
    assert (dropped.dropped_lines, dropped.dropped_tokens) == (1, 9)


def test_read_corpus_splits_documents_at_blank_lines(tmp_path):
    (tmp_path / "b.txt").write_text("third doc\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("\ufeffone\n two \n\n\nnext doc\n", encoding="utf-8")
    (tmp_path / ".hidden").write_text("ignored\n", encoding="utf-8")
    corpus = read_corpus(str(tmp_path))
    assert [os.path.basename(f) for f in corpus.files] == ["a.txt", "b.txt"]
    assert corpus.documents == [["one", "two"], ["next doc"], ["third doc"]]


def test_block_order_is_a_fresh_permutation_each_epoch():
    order = BlockOrder(10, seed=5)
    epoch0 = [order.block_at(g) for g in range(10)]
    epoch1 = [order.block_at(g) for g in range(10, 20)]
    assert sorted(epoch0) == sorted(epoch1) == list(range(10)) and epoch0 != epoch1
    again = BlockOrder(10, seed=5)
    assert [again.block_at(g) for g in range(25, 5, -1)] == [order.block_at(g) for g in range(25, 5, -1)]


def test_tokenizer_roundtrip_and_continuations(tmp_path):
    tokenizer = load_tokenizer(VOCAB)
    vocab = tokenizer.backend.get_vocab()
    flags = tokenizer.is_continuation()
    assert flags.dtype == torch.bool and flags.shape == (tokenizer.vocab_size,)
    assert flags[vocab["##s"]] and not flags[vocab["the"]] and not flags[tokenizer.mask_id]
    assert tokenizer.special_token_ids == [0, 1, 2, 3, 4]
    tokenizer.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    text = "Café Zürich: the Lighthouse's LAMP!"
    assert again.encode_with_offsets(text) == tokenizer.encode_with_offsets(text)
    assert again.fingerprint() == tokenizer.fingerprint()
    ids, spans = tokenizer.encode_with_offsets("Elmsworth")
    assert len(ids) > 1 and all(flags[i] for i in ids[1:])  # one word, continued pieces
    assert spans[0][0] == 0 and spans[-1][1] == len("Elmsworth")


def test_vocab_txt_follows_lowercase(tmp_path):
    """--vocab vocab.txt --lowercase ignored --lowercase: a lowercased vocabulary read cased
    text, so capitalised words became [UNK] and the saved tokenizer said do_lower_case
    false. A bare vocab.txt has no casing of its own and now follows the flag."""
    from spanbert_fast.train.pretraining import _vocab_option
    lower = tmp_path / "vocab.txt"
    lower.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nharbour\ntown\n",
                     encoding="utf-8")
    tokenizer = _vocab_option(str(lower), lowercase=True)
    assert tokenizer.lowercase
    ids, _ = tokenizer.encode_with_offsets("The Harbour Town")
    assert tokenizer.unk_id not in ids
    assert not _vocab_option(str(lower), lowercase=False).lowercase


def test_corpus_lines_split_at_newlines_only(tmp_path):
    """str.splitlines() also split at U+2029 and friends: one line became several, and two
    of them in a row a document boundary."""
    path = tmp_path / "corpus.txt"
    path.write_text("First A.\u2029\u2029still first.\nSecond line.\n\nNext doc.\n",
                    encoding="utf-8")
    documents = read_corpus(str(path)).documents
    assert len(documents) == 2 and len(documents[0]) == 2


def test_a_failed_tokenizer_save_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    """The four files were renamed into place one by one, so a failure on the third left a
    new tokenizer.json beside an old tokenizer_config.json; now none is replaced."""
    tokenizer = load_tokenizer(VOCAB)
    tokenizer.save(str(tmp_path))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_open = open

    def failing_open(file, *args, **kwargs):
        if "tokenizer_config.json" in os.path.basename(str(file)):
            raise OSError(28, "No space left on device")
        return real_open(file, *args, **kwargs)

    with open(CORPUS, encoding="utf-8") as handle:
        other = train_tokenizer(handle.read().splitlines(), 200, lowercase=True)
    monkeypatch.setattr("builtins.open", failing_open)
    with pytest.raises(OSError, match="No space left"):
        other.save(str(tmp_path))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_uncased_vocab_directory_follows_its_tokenizer_config(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\nlamp\n",
                                        encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": true}', encoding="utf-8")
    tokenizer = load_tokenizer(str(tmp_path))
    assert tokenizer.lowercase and tokenizer.encode_batch(["The LAMP"]) == [[5, 6]]
    # The vocab.txt named directly follows the tokenizer_config.json beside it too.
    named = load_tokenizer(str(tmp_path / "vocab.txt"))
    assert named.lowercase and named.encode_batch(["The LAMP"]) == [[5, 6]]


def test_train_tokenizer_refuses_a_size_without_room():
    with pytest.raises(InputError, match="above 5"):
        train_tokenizer(["some text"], 5)


def test_warmup_then_linear_decay():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = warmup_then_decay(optimizer, warmup_steps=4, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])


def test_weight_decay_skips_biases_and_layer_norms():
    model = SpanBertForPreTraining(SpanBertConfig.tiny())
    decay, no_decay = adamw_parameter_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    skipped = {names[id(p)] for p in no_decay["params"]}
    # LayerNorm modules are named LayerNorm, and layer_norm1/2 in the SBO head (whose
    # container, mlp_layer_norm, also holds the linear layers, which are decayed).
    is_norm_or_bias = re.compile(r"(\.bias|(LayerNorm|layer_norm\d)\.weight)$").search
    assert all(is_norm_or_bias(n) for n in skipped)
    assert not any(is_norm_or_bias(n) for n in decayed)
    assert "cls.pair_target_predictions.mlp_layer_norm.linear1.weight" in decayed
    assert "bert.embeddings.word_embeddings.weight" in decayed
    assert "cls.predictions.bias" in skipped
    assert len(decayed) + len(skipped) == len(list(model.parameters()))  # tied ones once
    assert math.isclose(sum(p.numel() for g in (decay, no_decay) for p in g["params"]),
                        sum(p.numel() for p in model.parameters()))
