"""Faithful to the original SpanBERT release by default: its SQuAD fine-tuning protocol,
random replacement tokens from the corpus unigram, the optimiser of its pretraining
command, over-long sentences dropped, [UNK] maskable, and what the release tarball lacks.

Each test's docstring states the original's rule in our words (facebookresearch/SpanBERT:
``code/run_squad.py`` and the README's commands for fine-tuning; the fairseq fork's
``data/no_nsp_span_bert_dataset.py``, ``data/masking.py``, ``optim/adam.py`` and the
pretraining README command for pretraining). The other behaviour stays an option, and
each test checks that option too.
"""

from __future__ import annotations

import argparse
import json
import os
import re

import numpy as np
import pytest
import torch

from spanbert_fast import SpanBertConfig, SpanBertForPreTraining, SpanBertModel
from spanbert_fast.train import pretraining
from spanbert_fast.train.commands import add_training_commands, main
from spanbert_fast.train.corpus import CorpusText, pack_corpus, read_corpus
from spanbert_fast.masking import IGNORE_INDEX, SpanMasker
from spanbert_fast.train.pretraining import TRAINING_STATE_FILE
from spanbert_fast.train.qa_finetuning import FinetuneQAOptions, run_finetune_qa
from spanbert_fast.train.squad import SquadExample, best_null_threshold
from spanbert_fast.train.tokenization import load_tokenizer
from spanbert_fast.train.training import adamw_parameter_groups
from data_files import DATA, CORPUS, VOCAB, SQUAD, SQUAD_V2  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_training_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


def _pretrain(out, *extra, corpus=CORPUS, seq_len="64"):
    return main(["pretrain", "--corpus", corpus, "--vocab", VOCAB, "--config", "tiny",
                 "--seq-len", seq_len, "--batch-size", "8", "--max-steps", "1",
                 "--save-every", "1", "--out", str(out), "--quiet", *extra])


# ---------------------------------------------------------------------------- SQuAD


def test_finetune_qa_defaults_are_the_original_squad_protocol():
    """The original README fine-tunes SQuAD 1.1 and 2.0 with run_squad.py at
    max_seq_length 512, doc_stride 128, learning rate 2e-5, 4 epochs, batch 32; run_squad.py
    evaluates the dev set eval_per_epoch (10) times per epoch, keeps the weights of the best
    evaluation by eval_metric (f1; best_f1 for 2.0, the F1 at the no-answer threshold tuned
    on dev) and blanks the predictions whose null-score difference exceeds that tuned
    threshold. (Before: 384 tokens, 3e-5, 2 epochs, one evaluation per epoch, last weights,
    threshold fixed at 0.0.)"""
    args = _parse(["finetune-qa", "--model", "m"])
    assert (args.epochs, args.lr, args.batch_size, args.eval_per_epoch) == (4.0, 2e-5, 32, 10)
    assert args.keep_best and args.tune_null_threshold and args.eval_each_epoch
    assert args.max_seq_len is None and args.doc_stride is None  # resolved below
    options = FinetuneQAOptions(model="m")
    assert (options.epochs, options.lr, options.batch_size, options.eval_per_epoch,
            options.keep_best, options.tune_null_threshold) == (4.0, 2e-5, 32, 10, True, True)
    off = _parse(["finetune-qa", "--model", "m", "--no-keep-best", "--no-tune-null-threshold"])
    assert not off.keep_best and not off.tune_null_threshold


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A briefly pretrained tiny model (512 positions), no dropout."""
    root = tmp_path_factory.mktemp("orig_qa")
    config = str(root / "tiny_no_dropout.json")
    SpanBertConfig.tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        max_position_embeddings=512).to_json(config)
    out = root / "pretrained"
    assert main(["pretrain", "--corpus", CORPUS, "--vocab", VOCAB, "--config", config,
                 "--seq-len", "64", "--batch-size", "8", "--max-steps", "30", "--lr", "5e-3",
                 "--warmup-steps", "3", "--save-every", "30", "--out", str(out),
                 "--quiet"]) == 0
    return str(out)


def test_finetune_evaluates_n_times_per_epoch_and_keeps_the_best(tmp_path, tiny_model_dir,
                                                                 capsys):
    """run_squad.py evaluates after every (batches per epoch // eval_per_epoch) batches of
    an epoch and saves the weights whenever the dev metric beats the best so far (strictly),
    so the model it ends with is the best evaluation's, not the last step's. The windows are
    512 tokens long by default (the tiny model allows 512 positions)."""
    result = run_finetune_qa(FinetuneQAOptions(
        model=tiny_model_dir, train=SQUAD, dev=SQUAD, out=str(tmp_path / "qa"), epochs=2,
        batch_size=4, lr=3e-3, eval_per_epoch=3, seed=1, progress=True))
    printed = capsys.readouterr().out
    windows = int(re.search(r"train: 20 questions -> (\d+) windows of <= 512 tokens",
                            printed).group(1))
    # ceil(windows / 4) batches per epoch; an evaluation every (batches // 3) of them.
    batches = -(-windows // 4)
    every = max(1, batches // 3)
    expected = [(epoch, (epoch - 1) * batches + k) for epoch in (1, 2)
                for k in range(every, batches + 1, every)]
    assert len(expected) >= 6
    assert [(e["epoch"], e["step"]) for e in result.evaluations] == expected
    f1s = [e["metrics"]["f1"] for e in result.evaluations]
    best = int(np.argmax(f1s))  # the first maximum, as a strict ">" keeps it
    assert result.best_step == result.evaluations[best]["step"]
    assert [e["best"] for e in result.evaluations] == [
        k == 0 or f1s[k] > max(f1s[:k]) for k in range(len(f1s))]
    assert result.metrics["f1"] == pytest.approx(f1s[best])
    with open(tmp_path / "qa" / "eval_results.json", encoding="utf-8") as handle:
        saved = json.load(handle)
    assert saved["best_step"] == result.best_step and len(saved["evaluations"]) == len(expected)
    # The saved model is the kept one: evaluating it again gives the best score.
    again = run_finetune_qa(FinetuneQAOptions(model=str(tmp_path / "qa"), dev=SQUAD,
                                              progress=False))
    assert again.metrics["f1"] == pytest.approx(f1s[best])

    last = run_finetune_qa(FinetuneQAOptions(
        model=tiny_model_dir, train=SQUAD, dev=SQUAD, epochs=2, batch_size=4, lr=3e-3,
        eval_per_epoch=3, seed=1, keep_best=False, progress=False))
    assert last.best_step is None
    assert last.metrics["f1"] == pytest.approx(last.evaluations[-1]["metrics"]["f1"])


def _example(qas_id, gold, impossible=False):
    answers = [] if impossible else [(gold, 0)]
    return SquadExample(qas_id=qas_id, question="q", context=gold or "c", answers=answers,
                        is_impossible=impossible)


def test_tuned_null_threshold_follows_the_official_v2_sweep():
    """SQuAD 2.0's official evaluation (run_squad.py's find_best_thresh): start from "no
    answer" everywhere (one point per unanswerable question), then visit the questions by
    increasing null-score difference, answering each with its best span: an answerable one
    gains its span's score, an unanswerable one loses its point. The best running total (its
    first occurrence) gives best_exact / best_f1 and the difference there is the threshold."""
    examples = [_example("q1", "red"), _example("q2", "blue"),
                _example("q3", "", impossible=True), _example("q4", "", impossible=True)]
    spans = {"q1": "red", "q2": "green", "q3": "x", "q4": "y"}
    diffs = {"q1": 0.2, "q2": 1.0, "q3": 3.0, "q4": 0.5}
    # all "": 2 points; +q1 (0.2): 3; +q4 (0.5): 2; +q2 (1.0): 2; +q3 (3.0): 1.
    assert best_null_threshold(examples, spans, diffs, "f1") == (75.0, 0.2)
    assert best_null_threshold(examples, spans, diffs, "exact_match") == (75.0, 0.2)
    # Nothing beats answering "" everywhere: the threshold sits below every difference.
    worse = dict(spans, q1="wrong")
    score, threshold = best_null_threshold(examples, worse, diffs, "f1")
    assert score == 50.0 and threshold < min(diffs.values())


def test_finetune_v2_reports_and_uses_the_tuned_threshold(tmp_path, tiny_model_dir):
    """For SQuAD 2.0 the original reports best_exact / best_f1 (and their thresholds) next to
    exact / f1 at a fixed threshold, and its predictions use the best_f1 threshold."""
    out = tmp_path / "qa2"
    assert main(["finetune-qa", "--model", tiny_model_dir, "--train", SQUAD_V2, "--dev",
                 SQUAD_V2, "--epochs", "1", "--batch-size", "16", "--out", str(out),
                 "--quiet"]) == 0
    metrics = json.loads((out / "eval_results.json").read_text())["metrics"]
    for key in ("best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"):
        assert key in metrics, key
    assert metrics["best_f1"] >= metrics["f1"] - 1e-9  # the sweep includes 0.0's decisions
    predictions = json.loads((out / "predictions.json").read_text())
    null_odds = json.loads((out / "null_odds.json").read_text())
    threshold = metrics["best_f1_thresh"]
    for qid, text in predictions.items():
        diff = float("inf") if null_odds[qid] is None else null_odds[qid]
        if diff > threshold:
            assert text == "", qid

    fixed = tmp_path / "fixed"
    assert main(["finetune-qa", "--model", str(out), "--dev", SQUAD_V2, "--out", str(fixed),
                 "--no-tune-null-threshold", "--quiet"]) == 0
    assert "best_f1" not in json.loads((fixed / "eval_results.json").read_text())["metrics"]


def test_release_directory_without_vocab_says_to_pass_tokenizer(tmp_path, capsys):
    """The original release tarball holds config.json and pytorch_model.bin only, no
    vocabulary (its fine-tuning code takes BERT's cased vocab): finetune-qa must say that
    --tokenizer is needed, in its one error line."""
    model = SpanBertConfig.tiny()
    release = tmp_path / "spanbert_hf_base"
    release.mkdir()
    model.to_json(str(release / "config.json"))
    torch.save({"bert." + k: v for k, v in SpanBertModel(model).state_dict().items()},
               release / "pytorch_model.bin")
    assert main(["finetune-qa", "--model", str(release), "--dev", SQUAD, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--tokenizer" in err and "release" in err and len(err.strip().splitlines()) == 1
    assert main(["finetune-qa", "--model", str(release), "--tokenizer", VOCAB, "--dev", SQUAD,
                 "--eval-batch-size", "32", "--quiet"]) == 0


# ---------------------------------------------------------------------------- pretraining


@pytest.fixture
def recorded_maskers(monkeypatch):
    """The keyword arguments of every SpanMasker the pretrain command builds."""
    calls = []

    class Recording(SpanMasker):
        def __init__(self, *args, **kwargs):
            calls.append(dict(kwargs, args=args))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pretraining, "SpanMasker", Recording)
    return calls


def _corpus_unigram(tokenizer, seq_len=64):
    blocks = pack_corpus(read_corpus(CORPUS), tokenizer, seq_len - 2)
    counts = np.bincount(blocks.tokens, minlength=tokenizer.vocab_size).astype(np.float64)
    return counts / counts.sum()


def _random_token_kl(masker_kwargs, tokenizer, reference):
    """KL(random replacement tokens || reference) in nats, from a masker built with
    ``masker_kwargs`` that replaces every span by random tokens, over the corpus blocks."""
    kwargs = {k: v for k, v in masker_kwargs.items() if k != "args"}
    kwargs.update(replace_probs=(0.0, 1.0, 0.0), mask_ratio=0.5, seed=3)
    masker = SpanMasker(*masker_kwargs["args"], **kwargs).to("cpu")
    blocks = pack_corpus(read_corpus(CORPUS), tokenizer, 62)
    rows = [[tokenizer.cls_id] + blocks.block(b) + [tokenizer.sep_id] for b in range(len(blocks))]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_id)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), True
    drawn = []
    for repeat in range(40):
        out = masker(ids, mask, offsets=torch.arange(len(rows)) + repeat * len(rows))
        drawn.append(out.input_ids[out.labels != IGNORE_INDEX])
    counts = np.bincount(torch.cat(drawn).numpy(), minlength=tokenizer.vocab_size)
    p = counts / counts.sum()
    seen = p > 0
    with np.errstate(divide="ignore"):
        return float(np.sum(p[seen] * (np.log(p[seen]) - np.log(reference[seen])))), int(counts.sum())


def test_random_tokens_come_from_the_corpus_unigram_and_unk_is_maskable(tmp_path,
                                                                       recorded_maskers):
    """The original replaces the 10% "random" spans with tokens drawn uniformly from the
    dataset's token buffer (np.random.choice over all corpus tokens), i.e. from the corpus
    unigram, not uniformly over the vocabulary; it masks blocks before adding [CLS]/[SEP], so
    any token of a block may be masked, [UNK] included. --random-tokens uniform and
    --no-mask-unk keep the former behaviour."""
    tokenizer = load_tokenizer(VOCAB)
    unigram = _corpus_unigram(tokenizer)
    assert _pretrain(tmp_path / "default") == 0
    default = recorded_maskers[-1]
    weights = np.asarray(default["unigram"], dtype=np.float64)
    assert np.allclose(weights / weights.sum(), unigram)
    assert tokenizer.unk_id not in default["special_token_ids"]
    assert {tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id, tokenizer.mask_id} <= set(
        default["special_token_ids"])
    assert _pretrain(tmp_path / "former", "--random-tokens", "uniform", "--no-mask-unk") == 0
    former = recorded_maskers[-1]
    assert tokenizer.unk_id in former["special_token_ids"]
    uniform = np.asarray(former["unigram"], dtype=np.float64)
    assert set(np.unique(uniform)) == {0.0, 1.0}
    assert np.flatnonzero(uniform == 0).tolist() == sorted(tokenizer.special_token_ids)

    kl_unigram, n = _random_token_kl(default, tokenizer, unigram)
    kl_uniform, _ = _random_token_kl(former, tokenizer, unigram)
    # Measured: 0.006 nats over 30k draws (sampling noise) vs inf for uniform draws (11% of
    # them are ids that never occur in the corpus; KL(unigram || uniform) is 0.66 nats).
    assert n > 10_000
    assert kl_unigram < 0.05 and kl_uniform > 0.5, (kl_unigram, kl_uniform)

    # An [UNK] of a block can be masked now (a row of [UNK]s, mask ratio 1).
    row = torch.tensor([[tokenizer.cls_id] + [tokenizer.unk_id] * 6 + [tokenizer.sep_id]])
    kwargs = {k: v for k, v in default.items() if k != "args"}
    kwargs.update(mask_ratio=1.0, is_continuation=None)
    labels = SpanMasker(*default["args"], **kwargs)(row).labels
    assert (labels[0, 1:-1] == tokenizer.unk_id).all()


def test_weight_decay_applies_to_every_parameter_as_the_release_command(tmp_path):
    """The release's pretraining command runs fairseq's Adam with --weight-decay 0.01 over
    one group holding every parameter, decaying each as p -= lr * wd * p (decoupled):
    biases and LayerNorm parameters too. --weight-decay-params weights keeps BERT's
    convention (none on biases and LayerNorm)."""
    for flag, expected in (((), 0.01), (("--weight-decay-params", "weights"), 0.0)):
        out = tmp_path / (flag[-1] if flag else "all")
        assert _pretrain(out, *flag) == 0
        state = torch.load(out / "checkpoint-1" / TRAINING_STATE_FILE, weights_only=True)
        groups = state["optimizer"]["param_groups"]
        assert [g["weight_decay"] for g in groups] == [0.01, expected]
        assert state["options"]["weight_decay_params"] == (flag[-1] if flag else "all")
    # The second group is the biases and LayerNorm parameters.
    model = SpanBertForPreTraining(SpanBertConfig.tiny())
    names = {id(p): n for n, p in model.named_parameters()}
    norm_and_bias = adamw_parameter_groups(model, 0.01, exempt_norm_and_bias=False)[1]
    assert norm_and_bias["weight_decay"] == 0.01
    assert all(names[id(p)].endswith(("bias", "weight")) for p in norm_and_bias["params"])
    assert "bert.embeddings.LayerNorm.weight" in {names[id(p)] for p in norm_and_bias["params"]}


def test_lines_longer_than_a_block_are_dropped_and_counted(tmp_path, capsys):
    """The original's block dataset (break_mode "doc") only appends a sentence that fits in
    a block (block size - 2 tokens); a longer one is skipped and the block being filled ends
    there. Ours cut such a line into block-sized pieces; now it is dropped by default,
    counted in the corpus log line, and --long-sentences cut keeps the former packing."""
    tokenizer = load_tokenizer(VOCAB)
    short, long_line = "The harbour town sits by the river.", " ".join(["The boats leave."] * 12)
    after = "The market opens at dawn."
    corpus = CorpusText(["x"], [[short, long_line, after]])
    n_short, n_long, n_after = (len(tokenizer.encode_batch([t])[0])
                                for t in (short, long_line, after))
    assert n_long > 30 >= n_short + n_after
    dropped = pack_corpus(corpus, tokenizer, 30)
    assert (dropped.dropped_lines, dropped.dropped_tokens) == (1, n_long)
    # The long line ends the first block; the next line starts a new one.
    assert [len(dropped.block(b)) for b in range(len(dropped))] == [n_short, n_after]
    cut = pack_corpus(corpus, tokenizer, 30, long_lines="cut")
    assert cut.dropped_lines == 0 and cut.num_tokens == n_short + n_long + n_after

    path = tmp_path / "corpus.txt"
    path.write_text("\n".join([short, long_line, after]) + "\n", encoding="utf-8")
    assert main(["pretrain", "--corpus", str(path), "--vocab", VOCAB, "--config", "tiny",
                 "--seq-len", "32", "--batch-size", "2", "--max-steps", "1",
                 "--out", str(tmp_path / "out")]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("corpus:") and f"dropped 1 line(s) longer than a block ({n_long} " \
        "tokens)" in first
    # Most of this corpus is the long line: said on stderr, where --quiet does not hide it.
    assert main(["pretrain", "--corpus", str(path), "--vocab", VOCAB, "--config", "tiny",
                 "--seq-len", "32", "--batch-size", "2", "--max-steps", "1", "--quiet",
                 "--out", str(tmp_path / "quiet")]) == 0
    err = capsys.readouterr().err
    assert "line(s) longer than a block of 32 tokens and are dropped" in err
    assert "--long-sentences cut" in err
