"""README.md's code blocks work as written (issue 18.6).

Every ```python block runs, in order and in one namespace, on the CPU, in a temporary
directory that holds what the README says the reader has: a tiny transformers BERT
checkpoint with its vocab.txt at ``path/to/spanbert-base-cased``. The one substitution,
said here rather than hidden: ``SpanBertConfig.base`` builds the tiny size, so that
pretraining a fresh model takes milliseconds instead of a 110M-parameter model.

Shell blocks (```bash, and the ``$ ...`` lines of the transcripts) are checked, not run:
each ``make`` target must exist in the Makefile, each ``spanbert-fast`` command line must
parse with the real command's parser (options and their values), each ``pytest`` path must
exist. Running them would mean set-up, benchmarks and training runs of minutes.
"""

from __future__ import annotations

import math
import os
import re
import shlex

import pytest
import torch

import spanbert_fast as sf

transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
README = os.path.join(ROOT, "README.md")
CHECKPOINT = "path/to/spanbert-base-cased"
# A cased WordPiece vocabulary that covers the README's sentences, with "##" pieces.
WORDS = ["Span", "##BERT", "masks", "contiguous", "spans", ".", "It", "predicts", "them",
         "from", "their", "boundaries", "the", "a", "##s", "##ed", "word", "piece"]

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _code_blocks(text: str):
    """(language, first line number, code) of every fenced block."""
    for match in re.finditer(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S):
        line = text.count("\n", 0, match.start()) + 2
        yield match.group(1), line, match.group(2)


def _readme_blocks(language: str):
    with open(README, encoding="utf-8") as handle:
        return [(line, code) for lang, line, code in _code_blocks(handle.read())
                if lang == language]


def _write_checkpoint(path: str) -> None:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64,
                                     max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.BertForPreTraining(config).save_pretrained(path)
    with open(os.path.join(path, "vocab.txt"), "w", encoding="utf-8") as handle:
        handle.write("\n".join(vocab) + "\n")


def test_python_snippets_run_as_written(tmp_path, monkeypatch):
    blocks = _readme_blocks("python")
    assert len(blocks) >= 4, "README.md lost its usage snippets"
    for line, code in blocks:
        for k, text in enumerate(code.splitlines()):
            if "cuda" in text:
                assert "is_available()" in text, (
                    f"README.md:{line + k}: CUDA used unconditionally: {text.strip()!r}")
    monkeypatch.chdir(tmp_path)
    _write_checkpoint(CHECKPOINT)
    monkeypatch.setattr(sf.SpanBertConfig, "base",
                        classmethod(lambda cls, **overrides: cls.tiny(**overrides)))
    namespace = {"__name__": "readme"}
    for line, code in blocks:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)

    # What the snippets say they produce.
    input_ids = namespace["input_ids"]
    assert input_ids.dim() == 2 and input_ids.dtype == torch.int64
    assert (input_ids == 1).sum() == 0, "the test vocabulary should cover the README's text"
    hidden = namespace["out"].last_hidden_state
    assert hidden.shape == (*input_ids.shape, 32)
    padded = namespace["attention_mask"] == 0
    assert padded.any() and torch.count_nonzero(hidden[padded]) == 0
    assert math.isfinite(namespace["loss"].item())
    assert sorted(os.listdir("out")) == ["config.json", "model.safetensors"]
    assert namespace["bert"].pooler is None, "the README's BertModel got a random pooler"
    assert sf.is_accelerated(namespace["hf_model"])
    assert namespace["start_logits"].shape == input_ids.shape


def _logical_lines(code: str):
    """Shell lines with continuations joined and comments dropped."""
    for line in code.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            yield words


def _shell_commands():
    """Every command of a ```bash block and every ``$ `` line of a transcript block."""
    with open(README, encoding="utf-8") as handle:
        text = handle.read()
    for language, line, code in _code_blocks(text):
        if language in ("bash", "sh", "shell"):
            yield from ((line, words) for words in _logical_lines(code))
        elif language == "":
            prompts = "\n".join(l[2:] for l in code.replace("\\\n", " ").splitlines()
                                if l.startswith("$ "))
            yield from ((line, words) for words in _logical_lines(prompts))


def _check_command(words, makefile: str) -> None:
    import importlib

    from spanbert_fast.train.cli import _load_benchmarks, _parser

    # spanbert_fast.benchmarks when installed, else benchmarks/ of the checkout
    bench_parser = importlib.import_module(_load_benchmarks().__name__ + ".cli").build_parser

    program, args = words[0], words[1:]
    if program == "make":
        for target in args:
            assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), \
                f"make {target}: no such target in the Makefile"
    elif program == "spanbert-fast":
        try:
            if args and args[0] == "bench":
                bench_parser("spanbert-fast bench").parse_args(args[1:])
            elif args and args[0] == "audit":
                audit = importlib.import_module(_load_benchmarks().__name__ + ".audit")
                audit.build_parser("spanbert-fast audit").parse_args(args[1:])
            else:
                parsed = _parser().parse_args(args)
                assert parsed.command is not None
        except SystemExit as exit:
            pytest.fail(f"{shlex.join(words)!r} does not parse (exit {exit.code}); see stderr")
    elif program == "pytest":
        paths = [a for a in args if not a.startswith("-")]
        for path in paths:
            assert os.path.exists(os.path.join(ROOT, path)), f"pytest {path}: no such path"
    else:
        pytest.fail(f"no check for README shell command {shlex.join(words)!r}; add one here")


def test_shell_snippets_name_real_targets_and_options():
    with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as handle:
        makefile = handle.read()
    commands = list(_shell_commands())
    programs = {words[0] for _, words in commands}
    assert {"make", "spanbert-fast"} <= programs, programs
    for line, words in commands:
        try:
            _check_command(words, makefile)
        except AssertionError as err:
            raise AssertionError(f"README.md block at line {line}: {err}") from None
