"""SpanBERT pretraining: the loop behind ``spanbert-fast pretrain``.

One optimizer step consumes ``batch_size`` blocks (the global batch, over all processes and
accumulation steps): global indices ``step * batch_size ... + batch_size - 1`` (see
:mod:`spanbert_fast.train.corpus`). Micro-batch ``m`` of process ``r`` takes the slice
``m * world * micro + r * micro ...`` of them. Every block is masked by
:class:`~spanbert_fast.masking.SpanMaskingCollator` with its global index as the random
stream's offset, and the loss is the global batch's mean MLM cross-entropy plus its mean
SBO cross-entropy (each process weights its means by its share of the targets), so a run
gives the same result on any number of processes up to the order of floating-point sums.

Checkpoints (``OUT/checkpoint-STEP/``) hold the model in transformers' layout
(``config.json`` + ``model.safetensors``), the tokenizer, ``training_state.pt``
(optimizer, schedule, loss scaler, sampler counter, data position, options) and one
``rng_state_rank{R}.pt`` per process (its RNG states and a digest of its parameters). A
checkpoint is assembled in a hidden temporary directory and renamed into place, so a
killed run leaves complete checkpoints only, and ``--resume`` continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..checkpoint import CONFIG_NAMES, SAFETENSORS_NAME, WEIGHT_NAMES
from ..config import SpanBertConfig
from .corpus import BlockOrder, PackedBlocks, pack_corpus, read_corpus
from .input_files import (InputError, check_positive, check_regularisation, check_in_range,
                          refuse_to_overwrite)
from ..masking import MAX_SPAN_WORDS_LIMIT, SpanMasker, SpanMaskingCollator
from ..modeling import SpanBertForPreTraining
from .tokenization import (TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, VOCAB_FILE,
                           WordPieceTokenizer, config_lowercase, load_tokenizer,
                           tokenizer_from_vocab_file, train_tokenizer)
from .training import (adamw_parameter_groups, autocast, check_backend, make_grad_scaler,
                       resolve_device, resolve_precision, rng_state, seed_everything,
                       set_rng_state, warmup_then_decay)

__all__ = ["PretrainOptions", "PretrainResult", "run_pretraining", "find_checkpoint",
           "CHECKPOINT_PREFIX", "TRAINING_STATE_FILE", "LOG_FILE"]

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_FILE = "training_state.pt"
RNG_STATE_FILE = "rng_state_rank{rank}.pt"
LOG_FILE = "train_log.jsonl"
# What makes a directory hold a model (any one of them): `pretrain` and `finetune-qa` do
# not replace these without --overwrite.
MODEL_FILES = CONFIG_NAMES + WEIGHT_NAMES
STATE_FORMAT = 1
PROG = "spanbert-fast"
# Options that decide which data each step sees and how it is masked: changing any of them
# on --resume makes the run differ from an uninterrupted one.
_EXACT_RESUME_OPTIONS = ("seq_len", "batch_size", "seed", "mask_ratio", "geometric_p",
                         "max_span_words", "lr", "warmup_steps", "lr_decay_power",
                         "max_steps", "weight_decay", "adam_beta1", "adam_beta2",
                         "adam_eps", "max_grad_norm", "random_tokens", "weight_decay_params",
                         "long_sentences", "mask_unk", "sbo_special_boundaries")
# What a checkpoint written before these options existed ran with (BERT's conventions,
# today's non-defaults): resuming it under the new defaults is then warned about.
_OPTIONS_BEFORE_THEY_EXISTED = {"random_tokens": "uniform", "weight_decay_params": "weights",
                                "long_sentences": "cut", "mask_unk": False,
                                "sbo_special_boundaries": True}
# Choices of the options where the original SpanBERT and BERT's convention differ; the
# first of each is the original's (the default).
RANDOM_TOKENS_CHOICES = ("unigram", "uniform")
WEIGHT_DECAY_PARAMS_CHOICES = ("all", "weights")
LONG_SENTENCES_CHOICES = ("drop", "cut")


@dataclass
class PretrainOptions:
    """Options of ``spanbert-fast pretrain`` (see ``--help`` for each)."""

    corpus: str
    out: str
    max_steps: int
    vocab: Optional[str] = None
    train_tokenizer: Optional[int] = None
    lowercase: bool = False
    config: str = "base"
    seq_len: Optional[int] = None
    batch_size: int = 256
    grad_accum_steps: int = 1
    # SpanBERT's optimiser: AdamW, peak lr 1e-4, eps 1e-8, 10k warm-up steps, linear decay.
    lr: float = 1e-4
    warmup_steps: Optional[int] = None
    lr_decay_power: float = 1.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    mask_ratio: float = 0.15
    geometric_p: float = 0.2
    max_span_words: int = 10
    precision: str = "auto"
    device: str = "auto"
    backend: str = "auto"
    seed: int = 0
    save_every: int = 1000
    keep_checkpoints: int = 2
    resume: Optional[str] = None
    log_every: int = 10
    progress: bool = True
    overwrite: bool = False  # replace a model already in ``out`` (else refuse)
    # Where the original SpanBERT release differs from BERT's conventions (README,
    # "Differences from the original"); the defaults are the original's.
    # Random replacement tokens: "unigram" = drawn from the corpus's token counts, as the
    # original (np.random.choice over the token buffer); "uniform" = uniform over the
    # vocabulary minus special tokens.
    random_tokens: str = "unigram"
    # Decoupled weight decay on "all" parameters, as the release command (fairseq's Adam,
    # one parameter group); "weights" exempts biases and LayerNorm (BERT's convention).
    weight_decay_params: str = "all"
    # A line longer than a block: "drop" it, as the original; or "cut" it into blocks.
    long_sentences: str = "drop"
    # [UNK] may be masked, as in the original (its blocks hold no special tokens).
    mask_unk: bool = True
    # SBO targets also for spans next to [CLS]/[SEP] (not in the original).
    sbo_special_boundaries: bool = False


@dataclass
class PretrainResult:
    """What a run did: one record per optimizer step it ran (``step`` counts from 1),
    the output directory and the last checkpoint written."""

    history: List[Dict[str, float]] = field(default_factory=list)
    out: str = ""
    last_checkpoint: Optional[str] = None


# ---------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------
@dataclass
class _Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _processes_from_env() -> _Processes:
    """This process's place in a ``torchrun`` launch (RANK / WORLD_SIZE / LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    return _Processes(rank=rank, world=world, local_rank=local_rank)


def _init_process_group(procs: _Processes, device: torch.device) -> None:
    if not procs.distributed or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL collectives run on the current device
    dist.init_process_group(backend=backend, rank=procs.rank, world_size=procs.world)
    procs.owns_group = True


# ---------------------------------------------------------------------------------------
# Option checks
# ---------------------------------------------------------------------------------------
def _model_config(spec: str) -> SpanBertConfig:
    presets = {"tiny": SpanBertConfig.tiny, "base": SpanBertConfig.base,
               "large": SpanBertConfig.large}
    if spec in presets:
        return presets[spec]()
    if not os.path.exists(spec):
        raise InputError(f"--config must be tiny, base, large or a config.json path; "
                         f"{spec!r} does not exist")
    try:
        return SpanBertConfig.from_json(spec)
    except (ValueError, TypeError, OSError, UnicodeDecodeError) as err:
        raise InputError(f"--config {spec!r}: {err}") from None


def _check_options(opts: PretrainOptions, procs: _Processes) -> None:
    for name in ("max_steps", "batch_size", "grad_accum_steps", "save_every", "log_every",
                 "lr", "keep_checkpoints"):
        check_positive(name, getattr(opts, name))
    if opts.resume is None and (opts.vocab is None) == (opts.train_tokenizer is None):
        raise InputError("give exactly one of --vocab vocab.txt and --train-tokenizer N")
    if opts.warmup_steps is not None and not 0 <= opts.warmup_steps <= opts.max_steps:
        raise InputError(f"--warmup-steps must be in [0, --max-steps={opts.max_steps}] (the "
                         f"learning rate would never reach its peak), got {opts.warmup_steps}")
    check_in_range("lr_decay_power", opts.lr_decay_power, 0.0, 100.0)
    for beta in (opts.adam_beta1, opts.adam_beta2):
        check_in_range("adam_betas", beta, 0.0, 1.0, high_open=True)
    check_in_range("adam_eps", opts.adam_eps, 0.0, 1.0)
    per_step = procs.world * opts.grad_accum_steps
    if opts.batch_size % per_step:
        raise InputError(f"--batch-size {opts.batch_size} (the global batch) must be a multiple "
                         f"of processes x --grad-accum-steps = {procs.world} x "
                         f"{opts.grad_accum_steps}")
    if not 0.0 < opts.mask_ratio < 1.0:
        raise InputError(f"--mask-ratio must be in (0, 1), got {opts.mask_ratio}")
    # Checked again by SpanMasker, which is built only after the tokenizer was saved.
    if not 0.0 < opts.geometric_p <= 1.0:
        raise InputError(f"--geometric-p must be in (0, 1], got {opts.geometric_p}")
    if not 1 <= opts.max_span_words <= MAX_SPAN_WORDS_LIMIT:
        raise InputError(f"--max-span-words must be in [1, {MAX_SPAN_WORDS_LIMIT}], got "
                         f"{opts.max_span_words}")
    check_regularisation(opts.max_grad_norm, opts.weight_decay)
    for name, choices in (("random_tokens", RANDOM_TOKENS_CHOICES),
                          ("weight_decay_params", WEIGHT_DECAY_PARAMS_CHOICES),
                          ("long_sentences", LONG_SENTENCES_CHOICES)):
        if getattr(opts, name) not in choices:
            raise InputError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)}, "
                             f"got {getattr(opts, name)!r}")
    if not 0 <= opts.seed < 2**63:
        raise InputError(f"--seed must be in [0, 2^63), got {opts.seed}")


# ---------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------
def _checkpoint_step(name: str) -> Optional[int]:
    match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", name)
    return int(match.group(1)) if match else None


def _checkpoints_in(directory: str) -> List[Tuple[int, str]]:
    found = []
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            step = _checkpoint_step(name)
            path = os.path.join(directory, name)
            if step is not None and os.path.isfile(os.path.join(path, TRAINING_STATE_FILE)):
                found.append((step, path))
    return sorted(found)


def find_checkpoint(path: str) -> str:
    """The checkpoint to resume from: ``path`` itself when it is one, else the latest
    complete ``checkpoint-STEP`` inside it."""
    if not os.path.exists(path):
        raise InputError(f"--resume {path!r} does not exist")
    if os.path.isfile(os.path.join(path, TRAINING_STATE_FILE)):
        return path
    found = _checkpoints_in(path)
    if not found:
        raise InputError(f"--resume {path!r} holds no checkpoint ({CHECKPOINT_PREFIX}STEP "
                         f"directory with {TRAINING_STATE_FILE})")
    return found[-1][1]


def _resumes_into(resume_dir: Optional[str], out: str) -> bool:
    """Whether the run resumes from one of ``out``'s own checkpoints (whose final model
    it then writes again, as the interrupted run would have)."""
    return (resume_dir is not None and
            os.path.realpath(os.path.dirname(os.path.normpath(resume_dir)))
            == os.path.realpath(out))


def _corrupt_checkpoint(resume_dir: str, path: str, err: BaseException) -> InputError:
    """One line: the file, what is wrong with it, and the checkpoint to resume from instead
    (the latest earlier one beside it, if any)."""
    reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if not isinstance(err, InputError):
        reason = f"{type(err).__name__}: {reason}" if reason else type(err).__name__
    step = _checkpoint_step(os.path.basename(os.path.normpath(resume_dir)))
    earlier = [p for s, p in _checkpoints_in(os.path.dirname(os.path.normpath(resume_dir)))
               if step is not None and s < step]
    instead = (f"resume from the previous checkpoint instead: --resume {earlier[-1]}" if earlier
               else "there is no earlier checkpoint beside it: start again without --resume")
    what = "is missing" if isinstance(err, FileNotFoundError) else "is corrupt or truncated"
    return InputError(f"checkpoint file {path!r} {what} ({reason}); {instead}")


def _read_checkpoint(resume_dir: str) -> Dict[str, Any]:
    """Read the training state of ``resume_dir`` and check that its other files can be read
    (the weights' header and size, the config, the tokenizer, every process's RNG file),
    before anything is written: a checkpoint cut by a full disk or a failed copy gave a
    traceback deep in the run. Returns the training state."""
    from ..checkpoint import find_weights_file, read_config, read_state_dict

    def load_pickle(path: str) -> Any:
        return torch.load(path, weights_only=True)

    def check_weights(directory: str) -> None:
        path = find_weights_file(directory)
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, framework="pt") as handle:  # the header and the file size
                handle.keys()
        else:
            read_state_dict(path)

    state_path = os.path.join(resume_dir, TRAINING_STATE_FILE)
    checks: List[Tuple[str, Callable[[], Any]]] = [
        (state_path, lambda: load_pickle(state_path)),
        (os.path.join(resume_dir, CONFIG_NAMES[0]), lambda: read_config(resume_dir)),
        (os.path.join(resume_dir, SAFETENSORS_NAME), lambda: check_weights(resume_dir)),
        (os.path.join(resume_dir, TOKENIZER_FILE), lambda: load_tokenizer(resume_dir)),
    ]
    for name in sorted(os.listdir(resume_dir)):
        if re.fullmatch(re.escape(RNG_STATE_FILE).replace(r"\{rank\}", r"\d+"), name):
            path = os.path.join(resume_dir, name)
            checks.append((path, lambda path=path: load_pickle(path)["rng"]))
    state = None
    for path, check in checks:
        try:
            value = check()
        except Exception as err:  # unpickling and safetensors raise many kinds
            if isinstance(err, FileNotFoundError) and err.filename:
                path = err.filename
            raise _corrupt_checkpoint(resume_dir, path, err) from None
        if path == state_path:
            state = value
    return state


def _parameter_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(name.encode())
        digest.update(param.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _save_torch(obj: Any, path: str) -> None:
    from ..io import atomic_write
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _write_checkpoint(out: str, step: int, procs: _Processes, model: SpanBertForPreTraining,
                      tokenizer: WordPieceTokenizer, training_state: Dict[str, Any],
                      keep: int) -> str:
    """Every process writes its RNG file into a hidden temporary directory, then the main
    process adds the rest and renames the directory into place (replacing an older
    checkpoint of the same step). Returns the checkpoint's path."""
    final = os.path.join(out, f"{CHECKPOINT_PREFIX}{step}")
    tmp = os.path.join(out, f".{CHECKPOINT_PREFIX}{step}.tmp")
    if procs.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    procs.barrier()
    _save_torch({"rng": rng_state(), "parameters_sha256": _parameter_digest(model)},
                os.path.join(tmp, RNG_STATE_FILE.format(rank=procs.rank)))
    procs.barrier()
    if procs.main:
        digests = {torch.load(os.path.join(tmp, RNG_STATE_FILE.format(rank=r)),
                              weights_only=True)["parameters_sha256"] for r in range(procs.world)}
        if len(digests) != 1:
            raise RuntimeError(f"the {procs.world} processes hold different parameters at step "
                               f"{step}: data-parallel training went out of sync")
        model.save_pretrained(tmp)
        tokenizer.save(tmp)
        _save_torch(training_state, os.path.join(tmp, TRAINING_STATE_FILE))
        old = None
        if os.path.exists(final):
            old = os.path.join(out, f".{CHECKPOINT_PREFIX}{step}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        # Prune the older ones; later steps left by a run resumed from an earlier
        # checkpoint are not counted (this run overwrites them when it gets there).
        for _, path in [c for c in _checkpoints_in(out) if c[0] <= step][:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    procs.barrier()
    return final


def _rewrite_log(out: str, last_step: int) -> None:
    """Keep the log entries of steps up to ``last_step`` (those a resumed run keeps)."""
    path = os.path.join(out, LOG_FILE)
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, "r", encoding="utf-8") as handle:
        for line in handle:
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a kill
    from ..io import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
    atomic_write(path, write)


# ---------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------
def _say(procs: _Processes, opts: PretrainOptions, message: str) -> None:
    if procs.main and opts.progress:
        from tqdm import tqdm
        tqdm.write(message, file=sys.stdout)


def _given_tokenizer(opts: PretrainOptions, resume_dir: Optional[str]
                     ) -> Optional[WordPieceTokenizer]:
    """The tokenizer of the checkpoint (on --resume) or of --vocab; None when it is to be
    trained on the corpus."""
    if resume_dir is not None:
        tokenizer = load_tokenizer(resume_dir)
        if opts.vocab is not None:
            given = _vocab_option(opts.vocab, opts.lowercase)
            if given.fingerprint() != tokenizer.fingerprint():
                raise InputError(f"--vocab {opts.vocab!r} differs from the vocabulary of the "
                                 f"checkpoint {resume_dir!r}; resume with the same vocabulary")
        return tokenizer
    if opts.vocab is not None:
        return _vocab_option(opts.vocab, opts.lowercase)
    return None


def _vocab_option(path: str, lowercase: bool) -> WordPieceTokenizer:
    """--vocab: a vocab.txt (or a directory with one and no tokenizer.json) takes its casing
    from the ``tokenizer_config.json`` beside it (``do_lower_case``: an uncased vocabulary
    read cased turned 4.6% of real English text into [UNK]), and follows --lowercase
    where there is none; a tokenizer.json says its casing itself. --lowercase must not
    contradict a casing the files state."""
    vocab_file = None
    if os.path.isfile(path) and not path.endswith(".json"):
        vocab_file = path
    elif (os.path.isdir(path) and not os.path.isfile(os.path.join(path, TOKENIZER_FILE))
          and os.path.isfile(os.path.join(path, VOCAB_FILE))):
        vocab_file = os.path.join(path, VOCAB_FILE)
    if vocab_file is not None:
        directory = os.path.dirname(vocab_file) or "."
        stated = config_lowercase(directory)
        if stated is False and lowercase:
            raise InputError(f"--lowercase was given but "
                             f"{os.path.join(directory, TOKENIZER_CONFIG_FILE)!r} says "
                             f"do_lower_case false for --vocab {path!r}; drop --lowercase")
        return tokenizer_from_vocab_file(vocab_file, lowercase=lowercase or bool(stated))
    tokenizer = load_tokenizer(path)
    if lowercase and not tokenizer.lowercase:
        raise InputError(f"--lowercase was given but --vocab {path!r} is a cased tokenizer; "
                         "drop --lowercase or give a lowercasing tokenizer")
    return tokenizer


def _trained_tokenizer(opts: PretrainOptions, procs: _Processes, corpus) -> WordPieceTokenizer:
    """Trained once, by the main process (the trainer may break frequency ties differently
    from one run to the next); the other processes read the files it saved."""
    if procs.main:
        tokenizer = train_tokenizer(corpus.lines(), opts.train_tokenizer, lowercase=opts.lowercase)
        tokenizer.save(opts.out)
    procs.barrier()
    return tokenizer if procs.main else load_tokenizer(opts.out)


def run_pretraining(opts: PretrainOptions,
                    step_callback: Optional[Callable[[int, Dict[str, float]], None]] = None
                    ) -> PretrainResult:
    """Run (or resume) pretraining. ``step_callback(step, record)`` is called after every
    optimizer step (and after that step's checkpoint, if any). Raises :class:`InputError`
    for unusable input; launched under ``torchrun``, joins the process group."""
    procs = _processes_from_env()
    _check_options(opts, procs)
    device = resolve_device(opts.device, procs.local_rank)
    precision = resolve_precision(opts.precision, device)
    check_backend(opts.backend, device)
    resume_dir = find_checkpoint(opts.resume) if opts.resume is not None else None
    state: Optional[Dict[str, Any]] = None
    if resume_dir is not None:
        state = _read_checkpoint(resume_dir)
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else None
            raise InputError(f"checkpoint {resume_dir!r} has training-state format "
                             f"{found!r}, this version reads {STATE_FORMAT}")
    corpus = read_corpus(opts.corpus)
    if opts.train_tokenizer is not None and opts.train_tokenizer <= 5 and resume_dir is None:
        raise InputError(f"--train-tokenizer needs a vocabulary size above 5 (the special "
                         f"tokens), got {opts.train_tokenizer}")
    if resume_dir is not None:
        config = _model_config(resume_dir)
    else:
        config = _model_config(opts.config)
    seq_len = opts.seq_len  # 0 is refused below, not taken for the default
    if seq_len is None:
        seq_len = min(512, config.max_position_embeddings)
    if seq_len < 3 or seq_len > config.max_position_embeddings:
        raise InputError(f"--seq-len must be in [3, {config.max_position_embeddings}] (the "
                         f"model's max_position_embeddings), got {seq_len}")
    opts = dataclasses.replace(opts, seq_len=seq_len)
    if opts.warmup_steps is None:
        opts = dataclasses.replace(opts, warmup_steps=min(10_000, opts.max_steps // 10))
    if resume_dir is None and _checkpoints_in(opts.out):
        raise InputError(f"--out {opts.out!r} already holds checkpoints of another run: pass "
                         f"--resume {opts.out} to continue it, or choose another directory")
    if not opts.overwrite and not _resumes_into(resume_dir, opts.out):
        refuse_to_overwrite(opts.out, MODEL_FILES, "a model")
    tokenizer = _given_tokenizer(opts, resume_dir)
    if procs.main:
        os.makedirs(opts.out, exist_ok=True)

    _init_process_group(procs, device)
    try:
        if tokenizer is None:
            tokenizer = _trained_tokenizer(opts, procs, corpus)
        return _train(opts, procs, device, precision, corpus, tokenizer, config, resume_dir,
                      state, step_callback)
    finally:
        if procs.owns_group and dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class _Run:
    """Everything a training step needs."""

    opts: PretrainOptions
    procs: _Processes
    device: torch.device
    precision: str
    blocks: PackedBlocks
    order: BlockOrder
    collator: SpanMaskingCollator
    model: SpanBertForPreTraining
    train_model: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    cls_id: int
    sep_id: int

    @property
    def micro_batch(self) -> int:
        return self.opts.batch_size // (self.procs.world * self.opts.grad_accum_steps)


def _train(opts: PretrainOptions, procs: _Processes, device: torch.device, precision: str,
           corpus, tokenizer: WordPieceTokenizer, config: SpanBertConfig,
           resume_dir: Optional[str], state: Optional[Dict[str, Any]],
           step_callback) -> PretrainResult:
    if resume_dir is None:
        if (tokenizer.vocab_size, tokenizer.pad_id) != (config.vocab_size, config.pad_token_id):
            if opts.config not in ("tiny", "base", "large"):
                _say(procs, opts, f"config: vocab_size {config.vocab_size} -> "
                                  f"{tokenizer.vocab_size} (the tokenizer's)")
            config = config.replace(vocab_size=tokenizer.vocab_size,
                                    pad_token_id=tokenizer.pad_id)
    elif tokenizer.vocab_size > config.vocab_size:
        raise InputError(f"checkpoint {resume_dir!r}: its tokenizer has {tokenizer.vocab_size} "
                         f"tokens but its model only {config.vocab_size}")
    if procs.main:
        tokenizer.save(opts.out)

    blocks = pack_corpus(corpus, tokenizer, opts.seq_len - 2, long_lines=opts.long_sentences)
    unknown = _unknown_token_warning(corpus, blocks, tokenizer)
    if unknown is not None:
        _warn(procs, unknown)
    dropped_share = blocks.dropped_tokens / max(1, blocks.dropped_tokens + blocks.num_tokens)
    if dropped_share > DROPPED_WARN_SHARE:  # a warning: --quiet hides the corpus line
        _warn(procs, f"{100 * dropped_share:.1f}% of the corpus's tokens are in "
                     f"{blocks.dropped_lines:,} line(s) longer than a block of {opts.seq_len} "
                     f"tokens and are dropped, as the original does; pass a longer --seq-len, "
                     f"or --long-sentences cut to keep them")
    _say(procs, opts, f"corpus: {len(corpus.files)} file(s), {len(corpus.documents)} documents, "
                      f"{blocks.num_tokens:,} tokens in {len(blocks):,} blocks of <= "
                      f"{opts.seq_len} tokens; vocabulary {tokenizer.vocab_size:,} "
                      f"({tokenizer.source}{', lowercased' if tokenizer.lowercase else ''})"
                      f"{_dropped_note(blocks)}")

    seed_everything(opts.seed)
    if resume_dir is None:
        model = SpanBertForPreTraining(config, backend=opts.backend)
    else:
        model = SpanBertForPreTraining.from_pretrained(resume_dir, backend=opts.backend)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    _say(procs, opts, f"model: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
                      f"{n_params / 1e6:.2f}M parameters; {device.type}, {precision}, "
                      f"{procs.world} process(es); global batch {opts.batch_size} x "
                      f"{opts.seq_len} tokens (blocks average "
                      f"{blocks.num_tokens / len(blocks) + 2:.1f} tokens)")
    # Dropout draws differ per process (as they would for more rows in one process).
    torch.manual_seed(opts.seed + 1 + procs.rank)

    try:
        masker = SpanMasker(tokenizer.mask_id, tokenizer.vocab_size,
                            is_continuation=tokenizer.is_continuation().to(device),
                            special_token_ids=_unmaskable_ids(tokenizer, opts.mask_unk),
                            mask_ratio=opts.mask_ratio, geometric_p=opts.geometric_p,
                            max_span_words=opts.max_span_words,
                            max_span_len=config.sbo_max_targets,
                            unigram=_random_token_weights(tokenizer, blocks, opts.random_tokens),
                            seed=opts.seed, sbo_special_boundaries=opts.sbo_special_boundaries)
    except (TypeError, ValueError) as err:  # --geometric-p, --max-span-words out of range
        raise InputError(f"span masking options: {err}") from None
    train_model: torch.nn.Module = model
    if procs.distributed:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    groups = adamw_parameter_groups(model, opts.weight_decay,
                                    exempt_norm_and_bias=opts.weight_decay_params == "weights")
    optimizer = torch.optim.AdamW(groups, lr=opts.lr,
                                  betas=(opts.adam_beta1, opts.adam_beta2), eps=opts.adam_eps)
    run = _Run(opts=opts, procs=procs, device=device, precision=precision, blocks=blocks,
               order=BlockOrder(len(blocks), opts.seed),
               collator=SpanMaskingCollator(masker, pad_token_id=tokenizer.pad_id),
               model=model, train_model=train_model, optimizer=optimizer,
               scheduler=warmup_then_decay(optimizer, opts.warmup_steps, opts.max_steps,
                                           opts.lr_decay_power),
               scaler=make_grad_scaler(precision, device),
               cls_id=tokenizer.cls_id, sep_id=tokenizer.sep_id)

    start_step = 0
    if state is not None:
        start_step = _restore(run, state, resume_dir, tokenizer)
        _say(procs, opts, f"resumed from {resume_dir} at step {start_step}")
    if procs.main:
        _rewrite_log(opts.out, start_step)

    result = PretrainResult(out=opts.out, last_checkpoint=resume_dir)
    progress = None
    if procs.main and opts.progress:
        from tqdm import tqdm
        progress = tqdm(total=opts.max_steps, initial=start_step, desc="pretrain", unit="step",
                        dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
    log_handle = (open(os.path.join(opts.out, LOG_FILE), "a", encoding="utf-8")
                  if procs.main else None)
    # Real (non-padding) tokens since the last log line, against the batch's nominal
    # batch_size x seq_len: blocks end at document boundaries, so they may be mostly padding.
    interval_tokens, interval_steps = 0.0, 0
    capacity = opts.batch_size * opts.seq_len
    stop = _StopRequest(announce=procs.main, below_progress_bar=progress is not None)
    restore_sigint = stop.install()
    try:
        for step in range(start_step, opts.max_steps):
            started = time.perf_counter()
            record = _train_step(run, step)
            record["seconds"] = time.perf_counter() - started
            record["tokens_per_second"] = record["tokens"] / max(record["seconds"], 1e-9)
            record["real_token_share"] = record["tokens"] / capacity
            interval_tokens += record["tokens"]
            interval_steps += 1
            result.history.append(record)
            if log_handle is not None:
                log_handle.write(json.dumps(record) + "\n")
                log_handle.flush()
            if progress is not None:
                progress.set_postfix_str(
                    f"loss {record['loss']:.3f} (mlm {record['mlm_loss']:.3f} sbo "
                    f"{record['sbo_loss']:.3f}) {record['tokens_per_second']:,.0f} tok/s",
                    refresh=False)
                progress.update(1)
            done = step + 1
            if done % opts.log_every == 0 or done == opts.max_steps:
                _say(procs, opts, f"step {done}/{opts.max_steps}  loss {record['loss']:.4f}  "
                                  f"mlm {record['mlm_loss']:.4f}  sbo {record['sbo_loss']:.4f}  "
                                  f"lr {record['lr']:.2e}  grad-norm {record['grad_norm']:.3f}  "
                                  f"{record['tokens_per_second']:,.0f} tok/s  real tokens "
                                  f"{100 * interval_tokens / (interval_steps * capacity):.0f}%")
                interval_tokens, interval_steps = 0.0, 0
            stopping = _stop_agreed(procs, stop, device) and done < opts.max_steps
            if done % opts.save_every == 0 or done == opts.max_steps or stopping:
                result.last_checkpoint = _write_checkpoint(
                    opts.out, done, procs, model, tokenizer, _training_state(run, done, tokenizer),
                    opts.keep_checkpoints)
            if step_callback is not None:
                step_callback(done, record)
            if stopping:
                if progress is not None:
                    progress.close()
                if procs.main:
                    print(f"interrupted at step {done}: saved checkpoint "
                          f"{result.last_checkpoint}\nresume with: {_resume_command(opts, procs)}",
                          flush=True)
                raise KeyboardInterrupt
    finally:
        restore_sigint()
        if progress is not None:
            progress.close()
        if log_handle is not None:
            log_handle.close()
    if procs.main:
        model.save_pretrained(opts.out)  # the final model beside its tokenizer
        _say(procs, opts, f"saved the model and tokenizer to {opts.out} "
                          f"(last checkpoint: {result.last_checkpoint})")
    procs.barrier()
    return result


class _StopRequest:
    """Ctrl-C during training: the first SIGINT asks the loop to finish its step, save a
    checkpoint and stop (it exited at once before, losing every step since the last
    checkpoint); a second one raises KeyboardInterrupt at once, as Python does."""

    def __init__(self, announce: bool = True, below_progress_bar: bool = False) -> None:
        self.requested = False
        self.announce = announce
        self.below_progress_bar = below_progress_bar

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            line_break = "\n" if self.below_progress_bar else ""
            print(f"{line_break}{PROG}: interrupt: saving a checkpoint after this step "
                  f"(Ctrl-C again to quit without it)", file=sys.stderr, flush=True)

    def install(self) -> Callable[[], None]:
        """Handle SIGINT (from the main thread only, where Python delivers signals);
        returns the function that puts the previous handler back."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.signal(signal.SIGINT, self._handle)
        return lambda: signal.signal(signal.SIGINT, previous)

    @contextlib.contextmanager
    def installed(self):
        restore = self.install()
        try:
            yield self
        finally:
            restore()


def _stop_agreed(procs: _Processes, stop: _StopRequest, device: torch.device) -> bool:
    """Whether any process was interrupted: every process stops after the same step (and
    writes its part of the checkpoint), whichever got the signal first."""
    if not procs.distributed:
        return stop.requested
    flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
    dist.all_reduce(flag)
    return bool(flag.item() > 0)


def _resume_command(opts: PretrainOptions, procs: _Processes) -> str:
    """The command line that continues this run from ``opts.out``: the run's options
    (defaults left out, --seq-len and --warmup-steps as resolved) and ``--resume OUT``."""
    launcher = ([PROG] if not procs.distributed else
                ["torchrun", f"--nproc_per_node={procs.world}", "-m", "spanbert_fast.train.cli"])
    args = launcher + ["pretrain", "--corpus", opts.corpus]
    defaults = PretrainOptions(corpus=opts.corpus, out=opts.out, max_steps=opts.max_steps)
    # Not repeated: --train-tokenizer (the tokenizer comes from the checkpoint) and what is
    # added below.
    skip = {"corpus", "train_tokenizer", "resume", "overwrite", "progress", "adam_beta1",
            "adam_beta2"}
    for item in dataclasses.fields(PretrainOptions):
        value = getattr(opts, item.name)
        if item.name in skip or (value == getattr(defaults, item.name)
                                 and item.name not in ("out", "max_steps")):
            continue
        flag = "--" + item.name.replace("_", "-")
        if isinstance(value, bool):
            # A switch on by default (--mask-unk) is turned off with its --no- form.
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    if (opts.adam_beta1, opts.adam_beta2) != (defaults.adam_beta1, defaults.adam_beta2):
        args += ["--adam-betas", str(opts.adam_beta1), str(opts.adam_beta2)]
    if not opts.progress:
        args.append("--quiet")
    return shlex.join(args + ["--resume", opts.out])


# The share of the corpus's tokens in over-long (dropped) lines above which pretrain warns
# even under --quiet: a corpus of one paragraph per line can lose most of its text.
DROPPED_WARN_SHARE = 0.05
# The [UNK] share of the first blocks above which pretrain warns (an uncased vocabulary
# read cased gave 4.6% on English text, and on the test corpus).
UNKNOWN_WARN_SHARE = 0.01
UNKNOWN_CHECK_BLOCKS = 100


def _unknown_token_warning(corpus, blocks: PackedBlocks,
                           tokenizer: WordPieceTokenizer) -> Optional[str]:
    """A warning when more than 1% of the tokens of the first blocks are [UNK], with the
    fix: --lowercase when lowercasing removes most of them."""
    sample = blocks.tokens[:blocks.offsets[min(len(blocks), UNKNOWN_CHECK_BLOCKS)]]
    share = float((sample == tokenizer.unk_id).mean()) if len(sample) else 0.0
    if share <= UNKNOWN_WARN_SHARE:
        return None
    message = (f"{100 * share:.1f}% of the tokens of the first "
               f"{min(len(blocks), UNKNOWN_CHECK_BLOCKS)} blocks are [UNK]")
    if not tokenizer.lowercase:
        lines = [line for _, line in zip(range(1000), corpus.lines())]
        lowered = tokenizer.lowercased()

        def unknown_share(tok: WordPieceTokenizer) -> float:
            ids = [i for row in tok.encode_batch(lines) for i in row]
            return sum(i == tok.unk_id for i in ids) / max(1, len(ids))
        cased, uncased = unknown_share(tokenizer), unknown_share(lowered)
        if uncased < cased / 2:
            return (f"{message}, {100 * uncased:.1f}% when lowercased: the vocabulary looks "
                    f"uncased; pass --lowercase (and start again)")
    return (f"{message}: the vocabulary does not fit the corpus (another language or "
            f"script?); pass a --vocab made for this text, or --train-tokenizer N")


def _random_token_weights(tokenizer: WordPieceTokenizer, blocks: PackedBlocks,
                          mode: str = "unigram") -> torch.Tensor:
    """(vocab_size,) float64 weights of the 10% random replacement tokens. "unigram" (the
    original): each id's count in the packed corpus, so rare pieces and unused entries are
    (almost) never drawn; [CLS]/[SEP] never occur inside blocks, and [UNK] as often as in
    the text. "uniform": every id but the special tokens alike."""
    if mode == "unigram":
        return torch.from_numpy(blocks.token_counts(tokenizer.vocab_size)).double()
    weights = torch.ones(tokenizer.vocab_size, dtype=torch.float64)
    weights[tokenizer.special_token_ids] = 0.0
    return weights


def _dropped_note(blocks: PackedBlocks) -> str:
    """The corpus log line's count of lines dropped for being longer than a block."""
    if not blocks.dropped_lines:
        return ""
    return (f"; dropped {blocks.dropped_lines:,} line(s) longer than a block "
            f"({blocks.dropped_tokens:,} tokens), as the original does (--long-sentences cut "
            f"keeps them)")


def _unmaskable_ids(tokenizer: WordPieceTokenizer, mask_unk: bool) -> List[int]:
    """The ids never masked: the special tokens, less [UNK] when it may be masked (the
    original masks any token of a block, [UNK] included)."""
    return [i for i in tokenizer.special_token_ids if not (mask_unk and i == tokenizer.unk_id)]


def _micro_batch_examples(run: _Run, step: int, micro_index: int) -> List[Dict[str, Any]]:
    """This process's share of micro-batch ``micro_index`` of optimizer step ``step``."""
    size, world = run.micro_batch, run.procs.world
    first = step * run.opts.batch_size + (micro_index * world + run.procs.rank) * size
    return [{"input_ids": [run.cls_id] + run.blocks.block(run.order.block_at(g)) + [run.sep_id],
             "index": g} for g in range(first, first + size)]


def _train_step(run: _Run, step: int) -> Dict[str, float]:
    """One optimizer step (0-based ``step``); returns its record (global losses)."""
    procs, device = run.procs, run.device
    batches = [{k: v.to(device, non_blocking=True)
                for k, v in run.collator(_micro_batch_examples(run, step, m)).items()}
               for m in range(run.opts.grad_accum_steps)]
    # Target counts of the whole global batch, so that each process weights its means by
    # its share and the gradient is that of the global mean losses.
    counts = torch.tensor([[int((b["labels"] != -100).sum()), b["sbo_targets"].shape[0],
                            int(b["attention_mask"].sum())] for b in batches],
                          dtype=torch.float64, device=device)
    totals = counts.sum(0)
    if procs.distributed:
        dist.all_reduce(totals)
    n_mlm, n_sbo = max(float(totals[0]), 1.0), max(float(totals[1]), 1.0)
    lr = run.optimizer.param_groups[0]["lr"]
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for m, batch in enumerate(batches):
        accumulate_only = procs.distributed and m < len(batches) - 1
        with run.train_model.no_sync() if accumulate_only else contextlib.nullcontext():
            with autocast(device, run.precision):
                out = run.train_model(batch["input_ids"], batch["attention_mask"],
                                      labels=batch["labels"], sbo_targets=batch["sbo_targets"])
            # DDP averages gradients over processes; the world factor turns that into a sum.
            objective = procs.world * (out.mlm_loss.float() * (float(counts[m, 0]) / n_mlm) +
                                       out.sbo_loss.float() * (float(counts[m, 1]) / n_sbo))
            run.scaler.scale(objective).backward()
        sums[0] += out.mlm_loss.detach().double() * counts[m, 0]
        sums[1] += out.sbo_loss.detach().double() * counts[m, 1]
    if procs.distributed:
        dist.all_reduce(sums)
    run.scaler.unscale_(run.optimizer)
    max_norm = run.opts.max_grad_norm if run.opts.max_grad_norm > 0 else math.inf
    grad_norm = torch.nn.utils.clip_grad_norm_(run.model.parameters(), max_norm)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    mlm, sbo = float(sums[0]) / n_mlm, float(sums[1]) / n_sbo
    return {"step": step + 1, "loss": mlm + sbo, "mlm_loss": mlm, "sbo_loss": sbo, "lr": lr,
            "grad_norm": float(grad_norm), "tokens": float(totals[2]),
            "mlm_targets": float(totals[0]), "sbo_targets": float(totals[1])}


def _training_state(run: _Run, step: int, tokenizer: WordPieceTokenizer) -> Dict[str, Any]:
    return {
        "format": STATE_FORMAT,
        "step": step,
        "blocks_consumed": step * run.opts.batch_size,
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "sampler": run.collator.state_dict(),
        "options": dataclasses.asdict(run.opts),
        "precision": run.precision,
        "world_size": run.procs.world,
        "data_fingerprint": run.blocks.fingerprint(),
        "tokenizer_fingerprint": tokenizer.fingerprint(),
    }


def _warn(procs: _Processes, message: str) -> None:
    if procs.main:
        print(f"spanbert-fast: warning: {message}", file=sys.stderr)


def _restore(run: _Run, state: Dict[str, Any], resume_dir: str,
             tokenizer: WordPieceTokenizer) -> int:
    """Load the optimizer, schedule, scaler, sampler and this process's RNG states; warn
    about anything that keeps the resumed run from matching an uninterrupted one."""
    procs = run.procs
    saved = state.get("options", {})
    if saved:
        # A checkpoint from before an option existed ran with what is now its non-default.
        saved = {**_OPTIONS_BEFORE_THEY_EXISTED, **saved}
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {getattr(run.opts, k)!r}"
               for k in _EXACT_RESUME_OPTIONS if k in saved and saved[k] != getattr(run.opts, k)]
    if changed:
        _warn(procs, f"resuming with changed options ({'; '.join(changed)}): the run will not "
                     f"match an uninterrupted one")
    if state.get("data_fingerprint") != run.blocks.fingerprint():
        _warn(procs, "the corpus (or its tokenization) differs from the checkpoint's: the "
                     "resumed run sees different data")
    # The optimizer's state (moments, step counts) comes from the checkpoint, but its
    # groups' hyper-parameters from this run's options: load_state_dict would otherwise
    # restore the saved weight decay, betas and eps, and a changed --weight-decay,
    # --weight-decay-params, --adam-betas or --adam-eps (warned about above) would do
    # nothing. The learning rate is the scheduler's.
    chosen = [{k: group[k] for k in ("weight_decay", "betas", "eps")}
              for group in run.optimizer.param_groups]
    run.optimizer.load_state_dict(state["optimizer"])
    for group, values in zip(run.optimizer.param_groups, chosen):
        group.update(values)
    run.scheduler.load_state_dict(state["scheduler"])
    if state.get("precision") == run.precision:
        run.scaler.load_state_dict(state["scaler"])
    else:
        _warn(procs, f"checkpoint trained in {state.get('precision')}, resuming in "
                     f"{run.precision}: the loss scale restarts")
    run.collator.load_state_dict(state["sampler"])
    rng_path = os.path.join(resume_dir, RNG_STATE_FILE.format(rank=procs.rank))
    if os.path.isfile(rng_path) and state.get("world_size") == procs.world:
        set_rng_state(torch.load(rng_path, weights_only=True)["rng"])
    else:
        _warn(procs, f"checkpoint written by {state.get('world_size')} process(es), resumed "
                     f"on {procs.world}: dropout draws restart from the seed")
    return int(state["step"])
