"""The training commands as a new user meets them (issue 18): nothing a user had is
overwritten or lost, and nothing trains silently on wrong data. Each test reproduces one
problem found by trying the package from the README: a padding tokenizer.json, an
overwritten model, corrupt checkpoints, an uncased vocabulary read cased, a backend that
failed after files were written, metrics that --quiet hid, Ctrl-C losing the steps since
the last checkpoint, and a log that hid how little of each block was text."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from spanbert_fast import SpanBertConfig, SpanBertForPreTraining
from spanbert_fast.train.commands import main
from spanbert_fast.train.corpus import pack_corpus, read_corpus
from spanbert_fast.train.squad import build_windows, read_squad
from spanbert_fast.train.tokenization import load_tokenizer
from data_files import DATA, CORPUS, VOCAB, SQUAD  # noqa: E402
from parity import one_cli_error_line  # noqa: E402


# One intra-op thread for this module's tiny models (tests/conftest.py says why).
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TINY_RUN = ["--corpus", CORPUS, "--config", "tiny", "--seq-len", "32", "--batch-size", "2",
            "--max-steps", "1"]


def _snapshot(directory) -> dict:
    return {name: (directory / name).read_bytes() for name in sorted(os.listdir(directory))
            if (directory / name).is_file()}


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A freshly initialised tiny model with the test vocabulary, as `pretrain` saves one."""
    directory = tmp_path / "model"
    tokenizer = load_tokenizer(VOCAB)
    SpanBertForPreTraining(SpanBertConfig.tiny(vocab_size=tokenizer.vocab_size)).save_pretrained(
        str(directory))
    tokenizer.save(str(directory))
    return directory


# ------------------------------------------------------- 1. padding / truncating tokenizer
def _padding_tokenizer_dir(tmp_path, length: int = 128, truncate_at: int = 24):
    """A folder with only a tokenizer.json that pads to ``length`` and truncates to
    ``truncate_at`` tokens, as sentence-transformers folders ship them, over the test
    vocabulary."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    with open(VOCAB, encoding="utf-8") as handle:
        vocab = {token: index for index, token in enumerate(handle.read().splitlines())}
    backend = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=False, strip_accents=False)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    backend.enable_padding(pad_id=vocab["[PAD]"], pad_token="[PAD]", length=length)
    backend.enable_truncation(max_length=truncate_at)
    directory = tmp_path / "sentence_transformer"
    directory.mkdir()
    backend.save(str(directory / "tokenizer.json"))
    return directory


def test_a_padding_and_truncating_tokenizer_json_encodes_like_its_vocab(tmp_path):
    """Its padding was counted as text (10x the tokens, blocks of [PAD]) and its truncation
    cut every QA context; the project's own encoding now turns both off."""
    padded = load_tokenizer(str(_padding_tokenizer_dir(tmp_path)))
    plain = load_tokenizer(VOCAB)
    corpus = read_corpus(CORPUS)
    lines = list(corpus.lines())
    assert padded.encode_batch(lines) == plain.encode_batch(lines)
    assert pack_corpus(corpus, padded, 62).num_tokens == pack_corpus(corpus, plain, 62).num_tokens
    examples, _ = read_squad(SQUAD)
    context = examples[0].context
    assert len(plain.encode_with_offsets(context)[0]) > 24  # longer than the truncation
    assert padded.encode_with_offsets(context) == plain.encode_with_offsets(context)
    windows = {name: build_windows(examples, tok, max_seq_len=64, doc_stride=None,
                                   max_query_len=64, for_training=True)
               for name, tok in (("padded", padded), ("plain", plain))}
    assert windows["padded"][1].answer_not_in_context == 0
    assert ([w.input_ids for w in windows["padded"][0]]
            == [w.input_ids for w in windows["plain"][0]])


def test_pretrain_counts_the_same_tokens_with_a_padding_tokenizer_json(tmp_path, capsys):
    counted = {}
    for name, vocab in (("plain", VOCAB), ("padded", str(_padding_tokenizer_dir(tmp_path)))):
        assert main(["pretrain", *TINY_RUN, "--vocab", vocab, "--out",
                     str(tmp_path / f"out_{name}")]) == 0
        corpus_line = next(line for line in capsys.readouterr().out.splitlines()
                           if line.startswith("corpus:"))
        counted[name] = re.search(r"([\d,]+) tokens in", corpus_line).group(1)
    assert counted["padded"] == counted["plain"]


# ------------------------------------------------------------------ 2. no silent overwrite
def test_pretrain_refuses_to_overwrite_a_model_without_overwrite(tmp_path, tiny_model_dir,
                                                                 capsys):
    before = _snapshot(tiny_model_dir)
    args = ["pretrain", *TINY_RUN, "--vocab", VOCAB, "--out", str(tiny_model_dir), "--quiet"]
    assert main(args) == 2
    message = one_cli_error_line(capsys)
    assert "already holds a model" in message and "config.json" in message
    assert "model.safetensors" in message and "--overwrite" in message
    assert _snapshot(tiny_model_dir) == before  # nothing touched, not even the tokenizer
    assert main(args + ["--overwrite"]) == 0
    assert _snapshot(tiny_model_dir)["model.safetensors"] != before["model.safetensors"]


def test_finetune_qa_refuses_to_overwrite_its_own_model(tiny_model_dir, capsys):
    before = _snapshot(tiny_model_dir)
    args = ["finetune-qa", "--model", str(tiny_model_dir), "--train", SQUAD, "--epochs", "0.2",
            "--batch-size", "8", "--out", str(tiny_model_dir), "--quiet"]
    assert main(args) == 2
    message = one_cli_error_line(capsys)
    assert "already holds a model" in message and "--overwrite" in message
    assert _snapshot(tiny_model_dir) == before
    assert main(args + ["--overwrite"]) == 0
    assert _snapshot(tiny_model_dir)["model.safetensors"] != before["model.safetensors"]


def test_finetune_qa_evaluation_refuses_to_overwrite_earlier_results(tmp_path, tiny_model_dir,
                                                                     capsys):
    out = tmp_path / "eval"
    args = ["finetune-qa", "--model", str(tiny_model_dir), "--dev", SQUAD, "--out", str(out),
            "--quiet"]
    assert main(args) == 0
    capsys.readouterr()
    (out / "predictions.json").write_text("{}", encoding="utf-8")
    assert main(args) == 2
    assert "predictions.json" in one_cli_error_line(capsys)
    assert (out / "predictions.json").read_text(encoding="utf-8") == "{}"
    assert main(args + ["--overwrite"]) == 0


# ------------------------------------------------------------------ 5. corrupt checkpoints
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("corrupt") / "run"
    assert main(["pretrain", "--corpus", CORPUS, "--vocab", VOCAB, "--config", "tiny",
                 "--seq-len", "32", "--batch-size", "2", "--max-steps", "4", "--save-every",
                 "2", "--out", str(out), "--quiet"]) == 0
    assert {"checkpoint-2", "checkpoint-4"} <= set(os.listdir(out))
    return out


def _truncate_half(path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("name", ["model.safetensors", "rng_state_rank0.pt",
                                  "training_state.pt", "config.json"])
def test_resume_from_a_corrupt_checkpoint_names_the_file_and_the_previous_one(
        tmp_path, two_checkpoints, capsys, name):
    """A half-written model.safetensors gave a 43-line traceback, a truncated
    rng_state_rank0.pt a torch traceback without the file's name."""
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    _truncate_half(out / "checkpoint-4" / name)
    args = ["pretrain", "--corpus", CORPUS, "--vocab", VOCAB, "--config", "tiny", "--seq-len",
            "32", "--batch-size", "2", "--max-steps", "6", "--save-every", "2", "--out",
            str(out), "--quiet"]
    log_before = (out / "train_log.jsonl").read_bytes()
    assert main(args + ["--resume", str(out)]) == 2
    message = one_cli_error_line(capsys)
    assert os.path.join("checkpoint-4", name) in message
    assert "corrupt or truncated" in message
    assert f"--resume {out / 'checkpoint-2'}" in message
    assert (out / "train_log.jsonl").read_bytes() == log_before  # nothing written
    # The checkpoint it names works.
    assert main(args + ["--resume", str(out / "checkpoint-2")]) == 0


def test_resume_from_the_only_checkpoint_when_it_is_corrupt(tmp_path, two_checkpoints, capsys):
    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    shutil.rmtree(out / "checkpoint-2")
    _truncate_half(out / "checkpoint-4" / "model.safetensors")
    assert main(["pretrain", "--corpus", CORPUS, "--config", "tiny", "--seq-len", "32",
                 "--batch-size", "2", "--max-steps", "6", "--out", str(out), "--quiet",
                 "--resume", str(out)]) == 2
    message = one_cli_error_line(capsys)
    assert "model.safetensors" in message and "no earlier checkpoint" in message


# -------------------------------------------------------------------- 7. uncased vocabulary
def _uncased_vocab(directory, with_config: bool):
    """The test vocabulary lowercased (duplicates dropped), as bert-base-uncased's is."""
    with open(VOCAB, encoding="utf-8") as handle:
        tokens = handle.read().splitlines()
    seen, lowered = set(), []
    for token in tokens:
        token = token if token.startswith("[") else token.lower()
        if token not in seen:
            seen.add(token)
            lowered.append(token)
    directory.mkdir()
    (directory / "vocab.txt").write_text("\n".join(lowered) + "\n", encoding="utf-8")
    if with_config:
        (directory / "tokenizer_config.json").write_text(
            json.dumps({"do_lower_case": True, "tokenizer_class": "BertTokenizer"}),
            encoding="utf-8")
    return directory / "vocab.txt"


def test_uncased_vocab_txt_follows_the_tokenizer_config_beside_it(tmp_path, capsys):
    """An uncased vocab.txt read cased turned 4.6% of the tokens into [UNK]; the
    tokenizer_config.json next to it said do_lower_case."""
    vocab = _uncased_vocab(tmp_path / "uncased", with_config=True)
    out = tmp_path / "out"
    assert main(["pretrain", *TINY_RUN, "--vocab", str(vocab), "--out", str(out),
                 "--quiet"]) == 0
    assert "[UNK]" not in capsys.readouterr().err
    saved = load_tokenizer(str(out))
    assert saved.lowercase
    assert saved.unk_id not in saved.encode_batch(["The Lighthouse keeper"])[0]


def test_load_tokenizer_on_a_vocab_txt_follows_the_tokenizer_config_beside_it(tmp_path):
    """finetune-qa --tokenizer path/vocab.txt read an uncased vocabulary cased (every
    capitalised word [UNK]); only a directory path looked at tokenizer_config.json."""
    vocab = _uncased_vocab(tmp_path / "uncased", with_config=True)
    for path in (str(vocab), str(vocab.parent)):
        tokenizer = load_tokenizer(path)
        assert tokenizer.lowercase, path
        assert tokenizer.unk_id not in tokenizer.encode_batch(["The Lighthouse keeper"])[0]


def test_lowercase_contradicting_the_tokenizer_config_is_refused(tmp_path, capsys):
    vocab = _uncased_vocab(tmp_path / "cased", with_config=False)
    (vocab.parent / "tokenizer_config.json").write_text('{"do_lower_case": false}',
                                                        encoding="utf-8")
    assert main(["pretrain", *TINY_RUN, "--vocab", str(vocab), "--lowercase", "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    assert "says do_lower_case false" in one_cli_error_line(capsys)


def test_a_cased_read_of_an_uncased_vocab_warns_with_the_fix(tmp_path, capsys):
    vocab = _uncased_vocab(tmp_path / "uncased", with_config=False)
    for lowercase in ([], ["--lowercase"]):
        assert main(["pretrain", *TINY_RUN, "--vocab", str(vocab), "--out",
                     str(tmp_path / f"out{len(lowercase)}"), "--quiet", *lowercase]) == 0
        err = capsys.readouterr().err
        if lowercase:
            assert "[UNK]" not in err
        else:
            warning = re.search(r"warning: ([\d.]+)% of the tokens of the first \d+ blocks are "
                                r"\[UNK\].*--lowercase", err)
            assert warning, err
            assert float(warning.group(1)) > 1.0
    # The directory form without a tokenizer_config.json follows --lowercase too.
    assert main(["pretrain", *TINY_RUN, "--vocab", str(vocab.parent), "--lowercase", "--out",
                 str(tmp_path / "out_dir"), "--quiet"]) == 0
    assert "[UNK]" not in capsys.readouterr().err


def test_a_cased_vocab_on_cased_text_does_not_warn(tmp_path, capsys):
    # --seq-len 64: at TINY_RUN's 32, 15% of this corpus is in lines longer than a block,
    # which is rightly warned about.
    assert main(["pretrain", *TINY_RUN, "--seq-len", "64", "--vocab", VOCAB, "--out",
                 str(tmp_path / "out"), "--quiet"]) == 0
    assert "warning" not in capsys.readouterr().err


# ---------------------------------------------------------- 8. options checked before writing
@pytest.mark.parametrize("case", ["triton on CPU", "bogus SPANBERT_FAST_BACKEND"])
@pytest.mark.parametrize("command", ["pretrain", "finetune-qa"])
def test_an_unusable_backend_fails_before_anything_is_written(tmp_path, tiny_model_dir,
                                                              monkeypatch, capsys, case, command):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: triton can run")
    if case == "triton on CPU":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        backend, expected = ["--backend", "triton"], "--backend triton cannot run"
    else:
        monkeypatch.setenv("SPANBERT_FAST_BACKEND", "bogus")
        backend, expected = [], "SPANBERT_FAST_BACKEND must be 'torch' or 'triton', got 'bogus'"
    out = tmp_path / "out"
    if command == "pretrain":
        args = ["pretrain", *TINY_RUN, "--vocab", VOCAB]
    else:
        args = ["finetune-qa", "--model", str(tiny_model_dir), "--train", SQUAD, "--epochs",
                "0.2"]
    assert main(args + backend + ["--out", str(out), "--quiet"]) == 2
    assert expected in one_cli_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("option, value, expected", [
    ("--geometric-p", "0", "--geometric-p must be in (0, 1], got 0.0"),
    ("--geometric-p", "1.5", "--geometric-p must be in (0, 1], got 1.5"),
    ("--max-span-words", "0", "--max-span-words must be in [1, 64], got 0"),
])
def test_span_masking_options_fail_before_anything_is_written(tmp_path, capsys, option, value,
                                                              expected):
    """They were checked when the masker was built, after the tokenizer was saved."""
    out = tmp_path / "out"
    assert main(["pretrain", *TINY_RUN, "--vocab", VOCAB, option, value, "--out", str(out),
                 "--quiet"]) == 2
    assert expected in one_cli_error_line(capsys)
    assert not out.exists()


# ------------------------------------------------------------------ 9. finetune-qa messages
def test_finetune_qa_prints_the_final_metrics_after_in_training_evaluations(tiny_model_dir,
                                                                           capsys):
    """With --no-keep-best the final model is the last step's, and the last in-training
    evaluation (every batches // N batches) need not be at the last step: its metrics were
    only in eval_results.json."""
    assert main(["finetune-qa", "--model", str(tiny_model_dir), "--train", SQUAD, "--dev",
                 SQUAD, "--epochs", "1", "--batch-size", "4", "--eval-per-epoch", "2",
                 "--no-keep-best", "--max-seq-len", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines and re.match(r"dev EM \d+\.\d\d  F1 \d+\.\d\d  \(20 questions\)",
                              lines[-1]), lines


def test_finetune_qa_quiet_still_prints_the_final_metrics(tiny_model_dir, capsys):
    assert main(["finetune-qa", "--model", str(tiny_model_dir), "--dev", SQUAD, "--quiet"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert len(lines) == 1 and re.match(r"dev EM \d+\.\d\d  F1 \d+\.\d\d  \(20 questions\)",
                                        lines[0]), captured.out
    assert captured.err == ""


def test_finetune_qa_warns_that_a_trained_model_will_not_be_saved(tiny_model_dir, capsys):
    assert main(["finetune-qa", "--model", str(tiny_model_dir), "--train", SQUAD, "--epochs",
                 "0.2", "--batch-size", "8", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning: no --out: the fine-tuned model will not be saved" in err


# ------------------------------------------------------------ 10. silent option handling
def test_seq_len_zero_is_refused_not_the_default(tmp_path, capsys):
    assert main(["pretrain", *TINY_RUN, "--vocab", VOCAB, "--seq-len", "0", "--out",
                 str(tmp_path / "out"), "--quiet"]) == 2
    assert "--seq-len must be in [3, 128] (the model's max_position_embeddings), got 0" in \
        one_cli_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_max_seq_len_zero_is_refused_not_the_default(tiny_model_dir, capsys):
    assert main(["finetune-qa", "--model", str(tiny_model_dir), "--dev", SQUAD,
                 "--max-seq-len", "0", "--quiet"]) == 2
    assert "--max-seq-len must be in [8, 128]" in one_cli_error_line(capsys)


def test_a_vocab_of_special_tokens_only_is_refused_by_name(tmp_path, capsys):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n", encoding="utf-8")
    assert main(["pretrain", *TINY_RUN, "--vocab", str(vocab), "--out", str(tmp_path / "out"),
                 "--quiet"]) == 2
    message = one_cli_error_line(capsys)
    assert "unigram" not in message
    assert f"vocabulary {str(vocab)!r} holds only the special tokens" in message
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ 11. Ctrl-C
def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(tmp_path):
    """SIGINT exited at once and lost every step since the last checkpoint. Now the first
    one finishes the step, saves a checkpoint and prints how to resume."""
    out = tmp_path / "out"
    command = [sys.executable, "-m", "spanbert_fast.train.commands", "pretrain", "--corpus", CORPUS,
               "--vocab", VOCAB, "--config", "tiny", "--seq-len", "32", "--batch-size", "2",
               "--max-steps", "100000", "--save-every", "100000", "--log-every", "1",
               "--out", str(out)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)
    try:
        for line in process.stdout:  # wait until training runs
            if line.startswith("step 2/"):
                break
        else:
            pytest.fail(f"no step line; stderr: {process.stderr.read()}")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr
    saved = re.search(r"saved checkpoint (\S+)", stdout)
    assert saved, stdout + stderr
    checkpoint = saved.group(1)
    step = int(checkpoint.rsplit("-", 1)[1])
    assert step >= 2 and os.path.isfile(os.path.join(checkpoint, "training_state.pt"))
    assert os.path.isfile(os.path.join(checkpoint, "model.safetensors"))
    with open(out / "train_log.jsonl", encoding="utf-8") as handle:
        assert len(handle.readlines()) == step  # the log ends where the checkpoint does
    resume_line = re.search(r"resume with: (.+)", stdout)
    assert resume_line, stdout
    resume = shlex.split(resume_line.group(1))
    assert resume[:2] == ["spanbert-fast", "pretrain"] and "--resume" in resume
    assert resume[resume.index("--resume") + 1] == str(out)
    # The printed command repeats every option of the run.
    from spanbert_fast.train.cli import _parser
    parsed = _parser().parse_args(resume[1:])
    assert (parsed.corpus, parsed.vocab, parsed.config, parsed.seq_len, parsed.batch_size,
            parsed.max_steps, parsed.save_every, parsed.out) == (
        CORPUS, VOCAB, "tiny", 32, 2, 100000, 100000, str(out))


def test_the_resume_command_repeats_every_option_that_differs_from_its_default(monkeypatch):
    """Each PretrainOptions field set away from its default (switches that default to on,
    such as --mask-unk, included) must come back from the printed command unchanged."""
    import dataclasses

    from spanbert_fast.train import commands, pretraining
    from spanbert_fast.train.cli import _parser

    changed = dict(
        vocab=VOCAB, lowercase=True, config="tiny", seq_len=32, batch_size=4,
        grad_accum_steps=2, lr=3e-4, warmup_steps=5, lr_decay_power=0.5, weight_decay=0.02,
        adam_beta1=0.8, adam_beta2=0.99, adam_eps=1e-6, max_grad_norm=2.0, mask_ratio=0.2,
        geometric_p=0.3, max_span_words=7, precision="fp32", device="cpu", backend="torch",
        seed=3, save_every=7, keep_checkpoints=3, log_every=2, progress=False,
        random_tokens="uniform", weight_decay_params="weights", long_sentences="cut",
        mask_unk=False, sbo_special_boundaries=True)
    opts = pretraining.PretrainOptions(corpus=CORPUS, out="runs/x", max_steps=9, **changed)
    defaults = pretraining.PretrainOptions(corpus=CORPUS, out="runs/x", max_steps=9)
    not_repeated = {"corpus", "out", "max_steps", "train_tokenizer", "resume", "overwrite"}
    untested = [f.name for f in dataclasses.fields(opts)
                if f.name not in not_repeated and f.name not in changed]
    assert not untested, f"give these fields a non-default value here: {untested}"
    assert all(getattr(opts, k) != getattr(defaults, k) for k in changed)

    command = shlex.split(pretraining._resume_command(opts, pretraining._Processes()))
    seen = []
    monkeypatch.setattr(pretraining, "run_pretraining", seen.append)
    args = _parser().parse_args(command[1:])
    commands._run_pretrain(args)
    assert dataclasses.replace(seen[0], resume=None) == opts
    assert seen[0].resume == "runs/x"


def test_a_second_ctrl_c_exits_at_once():
    from spanbert_fast.train.pretraining import _StopRequest
    stop = _StopRequest()
    previous = signal.getsignal(signal.SIGINT)
    with stop.installed():
        assert signal.getsignal(signal.SIGINT) is not previous
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is previous


# ----------------------------------------------------------------- 12. real-token share
def test_log_reports_the_share_of_real_tokens(tmp_path, capsys):
    """The log said "global batch 2 x 128 tokens" when blocks held far fewer; each log
    line now gives the real-token share of its interval, and the record per step."""
    out = tmp_path / "out"
    assert main(["pretrain", "--corpus", CORPUS, "--vocab", VOCAB, "--config", "tiny",
                 "--seq-len", "128", "--batch-size", "2", "--max-steps", "4", "--log-every",
                 "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    tokenizer = load_tokenizer(VOCAB)
    blocks = pack_corpus(read_corpus(CORPUS), tokenizer, 126)
    mean_len = blocks.num_tokens / len(blocks) + 2
    assert f"blocks average {mean_len:.1f} tokens" in printed
    with open(out / "train_log.jsonl", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    for record in records:
        assert record["real_token_share"] == pytest.approx(record["tokens"] / (2 * 128))
        assert record["real_token_share"] < 0.9  # the corpus's documents are short
    step_lines = [line for line in printed.splitlines() if line.startswith("step ")]
    assert len(step_lines) == 2
    for line, pair in zip(step_lines, (records[:2], records[2:])):
        share = sum(r["tokens"] for r in pair) / (2 * 2 * 128)
        assert f"real tokens {100 * share:.0f}%" in line


def test_resuming_into_the_runs_own_out_allows_a_trailing_slash(tmp_path):
    """Tab completion adds a slash: --resume OUT/checkpoint-200/ is still OUT's own
    checkpoint, so extending a finished run is not refused as an overwrite."""
    from spanbert_fast.train.pretraining import _resumes_into

    checkpoint = tmp_path / "out" / "checkpoint-200"
    checkpoint.mkdir(parents=True)
    for resume in (str(checkpoint), str(checkpoint) + "/", str(checkpoint) + "//"):
        assert _resumes_into(resume, str(tmp_path / "out")), resume
    assert not _resumes_into(str(checkpoint) + "/", str(tmp_path / "other"))


def test_resume_warns_about_options_an_old_checkpoint_predates_and_applies_changed_ones(
        tmp_path, two_checkpoints, capsys):
    """A checkpoint written before --random-tokens & co. existed ran with BERT's
    conventions: resuming it under the original's defaults must say so. And a changed
    --weight-decay must take effect (the optimizer's saved groups used to win silently)."""
    import torch

    out = tmp_path / "run"
    shutil.copytree(two_checkpoints, out)
    state_path = out / "checkpoint-4" / "training_state.pt"
    state = torch.load(state_path, weights_only=False)
    for key in ("random_tokens", "weight_decay_params", "long_sentences", "mask_unk",
                "sbo_special_boundaries"):
        del state["options"][key]
    torch.save(state, state_path)
    assert main(["pretrain", "--corpus", CORPUS, "--vocab", VOCAB, "--config", "tiny",
                 "--seq-len", "32", "--batch-size", "2", "--max-steps", "6", "--save-every",
                 "2", "--weight-decay", "0.05", "--out", str(out), "--resume", str(out),
                 "--quiet"]) == 0
    err = capsys.readouterr().err
    for change in ("--random-tokens 'uniform' -> 'unigram'", "--mask-unk False -> True",
                   "--sbo-special-boundaries True -> False", "--weight-decay 0.01 -> 0.05"):
        assert change in err, err
    resumed = torch.load(out / "checkpoint-6" / "training_state.pt", weights_only=False)
    assert [g["weight_decay"] for g in resumed["optimizer"]["param_groups"]] == [0.05, 0.05]
