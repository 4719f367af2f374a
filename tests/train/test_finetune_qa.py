"""SQuAD fine-tuning: the official metrics on hand-computed cases, sliding windows, answer
extraction, bad input through the command, and the pipeline overfitting a tiny sample."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from spanbert_fast import SpanBertConfig, SpanBertForQuestionAnswering
from spanbert_fast.train.commands import main
from spanbert_fast.train.squad import (QAWindow, SquadExample, build_windows, evaluate_predictions,
                                 exact_match_score, extract_answers, f1_score, normalize_answer,
                                 read_squad)
from spanbert_fast.train.tokenization import load_tokenizer
from data_files import DATA, CORPUS, VOCAB, SQUAD, SQUAD_V2  # noqa: E402
from parity import one_cli_error_line  # noqa: E402


# One intra-op thread for this module's tiny models (tests/conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


# ---------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("text, expected", [
    ("The  Quick, brown fox!", "quick brown fox"),
    ("an apple a day", "apple day"),
    ("Theatre of the Absurd", "theatre of absurd"),  # articles only as whole words
    ("  U.S.A.  ", "usa"),
    ("", ""),
])
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_and_f1_by_hand():
    assert exact_match_score("The Eiffel Tower", "eiffel tower.") == 1.0
    assert exact_match_score("Eiffel", "Eiffel Tower") == 0.0
    # "cat sat on mat" vs "cat on mat": 3 common, P = 3/4, R = 1, F1 = 2 * 3/4 / (7/4) = 6/7.
    assert f1_score("the cat sat on the mat", "cat on mat") == pytest.approx(6 / 7)
    # Bag of tokens: "x y y" vs "y y z" share y twice: P = R = 2/3.
    assert f1_score("x y y", "y y z") == pytest.approx(2 / 3)
    assert f1_score("x", "y") == 0.0
    # Empty answers (v2.0 definition): equal only to empty.
    assert f1_score("", "") == 1.0
    assert f1_score("", "cat") == 0.0
    assert f1_score("the", "a") == 1.0  # both normalise to nothing


def test_evaluate_predictions_by_hand():
    examples = [
        SquadExample("q1", "?", "ctx", [("Paris", 0), ("the city of Paris", 0)]),
        SquadExample("q2", "?", "ctx", [("1874", 0)]),
        SquadExample("q3", "?", "ctx", [("river", 0)]),
    ]
    # q1: best gold "the city of Paris" -> EM 1, F1 1. q2: "in 1874" vs "1874": EM 0,
    # P = 1/2, R = 1, F1 = 2/3. q3: no prediction -> 0.
    result = evaluate_predictions(examples, {"q1": "city of Paris", "q2": "in 1874"})
    assert result["exact_match"] == pytest.approx(100 * 1 / 3)
    assert result["f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert result["total"] == 3 and result["missing"] == 1
    assert "HasAns_exact" not in result


def test_evaluate_predictions_v2_splits():
    examples = [
        SquadExample("a", "?", "ctx", [("green river", 0)]),
        SquadExample("b", "?", "ctx", [], is_impossible=True),
        SquadExample("c", "?", "ctx", [], is_impossible=True),
    ]
    result = evaluate_predictions(examples, {"a": "the green river", "b": "", "c": "boats"})
    assert result["exact_match"] == pytest.approx(100 * 2 / 3)
    assert result["HasAns_exact"] == 100.0 and result["HasAns_total"] == 1
    assert result["NoAns_exact"] == 50.0 and result["NoAns_total"] == 2
    assert result["NoAns_f1"] == 50.0


# ---------------------------------------------------------------------------- windows
@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(VOCAB)


def _long_example(answer: str) -> SquadExample:
    with open(CORPUS, encoding="utf-8") as handle:
        sentences = [line.strip() for line in handle if line.strip()][:12]
    context = " ".join(sentences)
    return SquadExample("long", "What did the lamp burn at first?", context,
                        [(answer, context.index(answer) + 2)])  # answer_start off by 2


def test_windows_cover_the_context_with_the_stride(tokenizer):
    example = _long_example("whale oil")
    windows, stats = build_windows([example], tokenizer, max_seq_len=40, doc_stride=9,
                                   max_query_len=64, for_training=True)
    ctx_ids, ctx_spans = tokenizer.encode_with_offsets(example.context)
    question = tokenizer.encode_with_offsets(example.question)[0]
    assert len(windows) > 3 and stats.windows == len(windows)
    first_token = []
    seen_max_context = np.zeros(len(ctx_ids), dtype=int)
    for w in windows:
        assert len(w.input_ids) <= 40
        assert w.input_ids[:len(question) + 2] == [tokenizer.cls_id] + question + [tokenizer.sep_id]
        assert w.input_ids[-1] == tokenizer.sep_id
        assert w.token_type_ids == [0] * w.context_offset + [1] * (len(w.input_ids) - w.context_offset)
        begin = ctx_spans.index(w.char_spans[0])
        first_token.append(begin)
        assert w.input_ids[w.context_offset:-1] == ctx_ids[begin:begin + len(w.char_spans)]
        seen_max_context[begin:begin + len(w.char_spans)] += np.array(w.max_context, dtype=int)
    assert all(b - a == 9 for a, b in zip(first_token, first_token[1:]))
    assert first_token[-1] + len(windows[-1].char_spans) == len(ctx_ids)  # reaches the end
    assert (seen_max_context == 1).all()  # each token is "best seen" in exactly one window
    answer = example.answers[0][0]
    holding = [w for w in windows if w.start_position > 0]
    assert holding, "no window holds the answer"
    for w in windows:
        if w.start_position == 0:
            assert w.end_position == 0
            continue
        s, e = w.start_position - w.context_offset, w.end_position - w.context_offset
        assert example.context[w.char_spans[s][0]:w.char_spans[e][1]] == answer


def test_windows_skip_answers_missing_from_the_context(tokenizer):
    bad = SquadExample("bad", "Who?", "Boats leave the quay.", [("lighthouse", 3)])
    good = SquadExample("good", "What leaves?", "Boats leave the quay.", [("Boats", 0)])
    windows, stats = build_windows([bad, good], tokenizer, max_seq_len=32, doc_stride=None,
                                   max_query_len=64, for_training=True)
    assert stats.answer_not_in_context == 1 and stats.skipped_ids == ["bad"]
    assert [w.example_index for w in windows] == [1]
    assert windows[0].start_position == windows[0].context_offset


# ---------------------------------------------------------------------------- answers
def _window(example_index, context_offset, spans, max_context=None, length=None):
    n = length or context_offset + len(spans) + 1
    return QAWindow(example_index, [0] * n, [0] * n, context_offset, spans,
                    max_context or [True] * len(spans))


def test_extract_answers_picks_the_best_span_across_windows():
    context = "aa bb cc dd ee"
    spans = [(0, 2), (3, 5), (6, 8), (9, 11), (12, 14)]
    example = SquadExample("q", "?", context, [("cc dd", 6)])
    # Window 0 holds tokens 0..2, window 1 tokens 2..4 (offset 2 = [CLS] + 1 question token).
    w0 = _window(0, 2, spans[0:3], max_context=[True, True, False])
    w1 = _window(0, 2, spans[2:5])
    low = -10.0
    s0 = np.array([0, low, 1.0, 2.0, 9.0, low])  # token 2 would win, but is not max context here
    e0 = np.array([0, low, low, 1.0, 5.0, low])  # best allowed here: "bb cc" = 2.0 + 5.0
    s1 = np.array([0, low, 3.0, 1.0, low, low])  # start "cc"
    e1 = np.array([0, low, low, 2.5, 8.0, low])  # end "ee" (8.0) beats "dd" (2.5)
    predictions, _ = extract_answers([example], [w0, w1], [s0, s1], [e0, e1], n_best=5,
                                     max_answer_len=30)
    assert predictions == {"q": "cc dd ee"}
    predictions, _ = extract_answers([example], [w0, w1], [s0, s1], [e0, e1], n_best=5,
                                     max_answer_len=2)  # "cc dd ee" is 3 tokens: too long
    assert predictions == {"q": "dd ee"}  # 1.0 + 8.0 beats "bb cc" (7.0) and "cc dd" (5.5)


def test_extract_answers_v2_null_threshold():
    example = SquadExample("q", "?", "aa bb", [], is_impossible=True)
    window = _window(0, 2, [(0, 2), (3, 5)])
    starts = [np.array([4.0, 0.0, 1.0, 0.5, 0.0])]
    ends = [np.array([4.0, 0.0, 0.5, 2.0, 0.0])]
    # null = 8.0; best span "aa bb" = 1.0 + 2.0 = 3.0; diff = 5.0.
    predictions, diffs = extract_answers([example], [window], starts, ends, version_2=True)
    assert predictions == {"q": ""} and diffs["q"] == pytest.approx(5.0)
    predictions, _ = extract_answers([example], [window], starts, ends, version_2=True,
                                     null_score_diff_threshold=6.0)
    assert predictions == {"q": "aa bb"}


# ---------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A pretrained-then-saved tiny model without dropout (so the overfit is quick)."""
    root = tmp_path_factory.mktemp("qa")
    config = str(root / "tiny_no_dropout.json")
    SpanBertConfig.tiny(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).to_json(config)
    out = str(root / "pretrained")
    status = main(["pretrain", "--corpus", CORPUS, "--vocab", VOCAB, "--config", config,
                   "--seq-len", "64", "--batch-size", "8", "--max-steps", "100", "--lr", "5e-3",
                   "--warmup-steps", "10", "--save-every", "100", "--out", out, "--quiet"])
    assert status == 0
    return out


@pytest.mark.parametrize("content, expected", [
    ('{"data": [{"title": "x"}]}', "not in SQuAD format: data[0] has no 'paragraphs'"),
    ('{"data": [{"paragraphs": [{"context": "c", "qas": [{"id": "1", "answers": []}]}]}]}',
     "data[0].paragraphs[0].qas[0] has no 'question'"),
    ('{"version": "1.1"}', "the top level has no 'data'"),
    ('[1, 2]', "the top level must be an object"),
    ('{"data": [', "is not valid JSON"),
    ('', "is empty"),
])
def test_finetune_rejects_bad_squad_json(tmp_path, capsys, tiny_model_dir, content, expected):
    path = tmp_path / "train.json"
    path.write_text(content, encoding="utf-8")
    status = main(["finetune-qa", "--model", tiny_model_dir, "--train", str(path), "--quiet"])
    assert status == 2
    assert expected in one_cli_error_line(capsys)


def test_finetune_rejects_missing_files(tmp_path, capsys, tiny_model_dir):
    assert main(["finetune-qa", "--model", tiny_model_dir, "--train",
                 str(tmp_path / "nope.json"), "--quiet"]) == 2
    assert "does not exist" in one_cli_error_line(capsys)
    assert main(["finetune-qa", "--model", str(tmp_path / "no_model"), "--train", SQUAD,
                 "--quiet"]) == 2
    message = one_cli_error_line(capsys)
    # A mistyped --model is not blamed on the original release's missing vocabulary.
    assert "--model" in message and "does not exist" in message and "--tokenizer" not in message
    assert main(["finetune-qa", "--model", tiny_model_dir, "--quiet"]) == 2
    assert "--train, --dev or both" in one_cli_error_line(capsys)


@pytest.mark.parametrize("option, value, expected", [
    ("--epochs", "nan", "--epochs must be positive, got nan"),  # was a traceback in round()
    ("--lr", "inf", "--lr must be positive, got inf"),
    ("--weight-decay", "-1", "--weight-decay must be >= 0, got -1.0"),  # was accepted
    ("--max-grad-norm", "-1", "--max-grad-norm must be >= 0, got -1.0"),
])
def test_finetune_rejects_bad_optimiser_options(capsys, tiny_model_dir, option, value, expected):
    assert main(["finetune-qa", "--model", tiny_model_dir, "--train", SQUAD, option, value,
                 "--quiet"]) == 2
    assert expected in one_cli_error_line(capsys)


# ---------------------------------------------------------------------------- the pipeline
def test_finetune_overfits_the_tiny_sample(tmp_path, tiny_model_dir, capsys):
    out = str(tmp_path / "qa")
    status = main(["finetune-qa", "--model", tiny_model_dir, "--train", SQUAD, "--dev", SQUAD,
                   "--epochs", "80", "--batch-size", "8", "--lr", "3e-3", "--no-eval-each-epoch",
                   "--out", out])
    assert status == 0
    printed = capsys.readouterr().out
    assert "dev EM" in printed and "SQuAD v1.1" in printed
    with open(os.path.join(out, "eval_results.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)["metrics"]
    assert metrics["f1"] > 90.0, metrics
    with open(os.path.join(out, "predictions.json"), encoding="utf-8") as handle:
        predictions = json.load(handle)
    examples, _ = read_squad(SQUAD)
    assert set(predictions) == {e.qas_id for e in examples}
    # The fine-tuned model and tokenizer reload from the output directory, QA head included.
    SpanBertForQuestionAnswering.from_pretrained(out)
    assert load_tokenizer(out).fingerprint() == load_tokenizer(VOCAB).fingerprint()


def test_finetune_v2_reports_unanswerable_questions(tmp_path, tiny_model_dir, capsys):
    out = str(tmp_path / "qa2")
    status = main(["finetune-qa", "--model", tiny_model_dir, "--train", SQUAD_V2, "--dev",
                   SQUAD_V2, "--epochs", "1", "--batch-size", "16", "--out", out, "--quiet"])
    assert status == 0
    with open(os.path.join(out, "eval_results.json"), encoding="utf-8") as handle:
        metrics = json.load(handle)["metrics"]
    assert metrics["NoAns_total"] == 5 and metrics["HasAns_total"] == 20
    with open(os.path.join(out, "null_odds.json"), encoding="utf-8") as handle:
        assert len(json.load(handle)) == 25


def test_finetune_reads_a_transformers_bert_checkpoint(tmp_path, capsys):
    """A directory written by transformers (BertForPreTraining + its tokenizer files)."""
    transformers = pytest.importorskip("transformers")
    directory = str(tmp_path / "hf_bert")
    tokenizer = load_tokenizer(VOCAB)
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32,
                                     num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64)
    transformers.BertForPreTraining(config).save_pretrained(directory)
    # From a directory: transformers 5 ignores BertTokenizerFast(vocab_file=...) and built a
    # tokenizer of the 5 special tokens only (now refused by load_tokenizer).
    os.makedirs(tmp_path / "vocab")
    shutil.copy(VOCAB, tmp_path / "vocab" / "vocab.txt")
    hf_tokenizer = transformers.BertTokenizer.from_pretrained(str(tmp_path / "vocab"),
                                                             do_lower_case=False)
    assert len(hf_tokenizer) == tokenizer.vocab_size
    hf_tokenizer.save_pretrained(directory)
    assert main(["finetune-qa", "--model", directory, "--dev", SQUAD, "--out",
                 str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    assert "new QA head" in printed and "dev EM" in printed
    with open(tmp_path / "eval" / "predictions.json", encoding="utf-8") as handle:
        assert len(json.load(handle)) == 20
