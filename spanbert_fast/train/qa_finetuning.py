"""Extractive QA fine-tuning and evaluation on SQuAD: the loop behind
``spanbert-fast finetune-qa``.

The model starts from any checkpoint directory :class:`SpanBertForQuestionAnswering` can
read (one written by ``spanbert-fast pretrain``, a transformers BERT directory, the
original SpanBERT release); a checkpoint without a QA head gets a fresh one. The
tokenizer is read from the same directory (``tokenizer.json`` or ``vocab.txt``) unless
``--tokenizer`` names another (the original release ships no vocabulary: pass
``--tokenizer`` with BERT's cased ``vocab.txt`` there).

The defaults are the original SpanBERT's SQuAD protocol (its README's ``run_squad.py``
commands): windows of 512 tokens with a stride of 128, lr 2e-5, 4 epochs, batch 32, the
dev set evaluated ``eval_per_epoch`` = 10 times per epoch and the best evaluation's weights
kept (by F1; for SQuAD 2.0 by ``best_f1``, the F1 with the no-answer threshold tuned on
dev, which is also the threshold the predictions use).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .. import checkpoint
from .input_files import InputError, check_positive, check_regularisation, refuse_to_overwrite
from ..modeling import SpanBertForQuestionAnswering
from .squad import (QAWindow, SquadExample, best_null_threshold, build_windows,
                    evaluate_predictions, extract_answers, read_squad)
from .tokenization import WordPieceTokenizer, load_tokenizer
from .training import (adamw_parameter_groups, autocast, check_backend, make_grad_scaler,
                       resolve_device, resolve_precision, seed_everything, warmup_then_decay)

__all__ = ["FinetuneQAOptions", "FinetuneQAResult", "run_finetune_qa", "load_qa_model"]


@dataclass
class FinetuneQAOptions:
    """Options of ``spanbert-fast finetune-qa`` (see ``--help`` for each)."""

    model: str
    train: Optional[str] = None
    dev: Optional[str] = None
    out: Optional[str] = None
    tokenizer: Optional[str] = None
    # The original's SQuAD protocol (README commands of run_squad.py): 4 epochs, lr 2e-5,
    # batch 32, 512-token windows (max_seq_len None = 512 or the model's limit).
    epochs: float = 4.0
    batch_size: int = 32
    eval_batch_size: int = 64
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_seq_len: Optional[int] = None
    doc_stride: Optional[int] = None  # 128, or half a window's context part if shorter
    max_query_len: int = 64
    max_answer_len: int = 30
    n_best: int = 20
    version_2: Optional[bool] = None  # None: from the data (any is_impossible question)
    null_score_diff_threshold: float = 0.0
    eval_each_epoch: bool = True  # else only once, after training
    seed: int = 42
    precision: str = "auto"
    device: str = "auto"
    backend: str = "auto"
    progress: bool = True
    overwrite: bool = False  # replace a model or results already in ``out`` (else refuse)
    # Dev evaluations per epoch while training (every batches_per_epoch // N batches, as
    # run_squad.py's --eval_per_epoch, default 10); with keep_best the final model is the
    # best-scoring evaluation's (f1; best_f1 for SQuAD 2.0 with a tuned threshold).
    eval_per_epoch: int = 10
    keep_best: bool = True
    # SQuAD 2.0: also report best_exact / best_f1 with the no-answer threshold tuned on dev
    # and use the best_f1 threshold for the predictions (exact_match / f1 stay at
    # null_score_diff_threshold).
    tune_null_threshold: bool = True


@dataclass
class FinetuneQAResult:
    """Per-epoch training loss and dev metrics, the final dev metrics and predictions;
    ``evaluations``: every dev evaluation during training (step, epoch, metrics)."""

    epochs: List[Dict[str, float]] = field(default_factory=list)
    evaluations: List[Dict[str, Any]] = field(default_factory=list)
    best_step: Optional[int] = None  # the step whose weights were kept (keep_best)
    metrics: Optional[Dict[str, float]] = None
    predictions: Optional[Dict[str, str]] = None


def _say(opts: FinetuneQAOptions, message: str) -> None:
    if opts.progress:
        from tqdm import tqdm
        tqdm.write(message, file=sys.stdout)


def load_qa_model(path: str, backend: str = "auto") -> Tuple[SpanBertForQuestionAnswering, bool]:
    """A QA model from the checkpoint at ``path``; returns ``(model, fresh_head)`` where
    ``fresh_head`` says the checkpoint had no ``qa_outputs`` and the head is new."""
    if not os.path.exists(path):
        raise InputError(f"--model {path!r} does not exist")
    try:
        config = checkpoint.read_config(path)
        state = checkpoint.read_state_dict(path)
    except (ValueError, OSError) as err:
        raise InputError(f"--model {path!r}: {str(err).splitlines()[0]}") from None
    model = SpanBertForQuestionAnswering(config, backend=backend)
    converted, _ = checkpoint.convert_state_dict(state, "qa", config)
    fresh_head = not any(name.startswith("qa_outputs.") for name in converted)
    if fresh_head:  # a pretraining or encoder checkpoint: keep the initialised head
        state = dict(state)
        state.update({f"qa_outputs.{k}": v for k, v in model.qa_outputs.state_dict().items()})
    try:
        checkpoint.load_into(model, state, strict=True)
    except ValueError as err:
        raise InputError(f"--model {path!r}: {str(err).splitlines()[0]}") from None
    return model, fresh_head


# The result files an evaluation writes into --out.
RESULT_FILES = ("predictions.json", "null_odds.json", "eval_results.json")


def _check_out(opts: FinetuneQAOptions) -> None:
    """Refuse to replace a model (when training will save one) or earlier results (when
    evaluating) in ``--out`` without --overwrite; ``--model M --out M`` would replace the
    pretrained weights with the fine-tuned ones."""
    if opts.out is None or opts.overwrite:
        return
    if opts.train is not None:
        from .pretraining import MODEL_FILES
        same = (os.path.exists(opts.model) and os.path.exists(opts.out)
                and os.path.samefile(opts.model, opts.out))
        refuse_to_overwrite(opts.out, MODEL_FILES, "a model",
                            " (it is --model: fine-tuning would replace its weights)"
                            if same else "")
    if opts.dev is not None:
        refuse_to_overwrite(opts.out, RESULT_FILES, "evaluation results")


def _batches(windows: Sequence[QAWindow], order: Sequence[int], size: int, pad_id: int,
             device: torch.device, with_labels: bool):
    for first in range(0, len(order), size):
        chosen = [windows[i] for i in order[first:first + size]]
        width = max(len(w.input_ids) for w in chosen)
        input_ids = torch.full((len(chosen), width), pad_id, dtype=torch.int64)
        token_types = torch.zeros((len(chosen), width), dtype=torch.int64)
        mask = torch.zeros((len(chosen), width), dtype=torch.int64)
        for row, window in enumerate(chosen):
            n = len(window.input_ids)
            input_ids[row, :n] = torch.tensor(window.input_ids)
            token_types[row, :n] = torch.tensor(window.token_type_ids)
            mask[row, :n] = 1
        batch = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_types}
        if with_labels:
            batch["start_positions"] = torch.tensor([w.start_position for w in chosen])
            batch["end_positions"] = torch.tensor([w.end_position for w in chosen])
        yield {k: v.to(device) for k, v in batch.items()}


def _predict(model, windows: List[QAWindow], opts: FinetuneQAOptions, pad_id: int,
             device: torch.device, precision: str) -> Tuple[List[np.ndarray], List[np.ndarray]]:
    model.eval()
    starts: List[np.ndarray] = []
    ends: List[np.ndarray] = []
    with torch.no_grad():
        for batch in _batches(windows, range(len(windows)), opts.eval_batch_size, pad_id,
                              device, with_labels=False):
            with autocast(device, precision):
                out = model(**batch)
            lengths = batch["attention_mask"].sum(1).tolist()
            for row, n in enumerate(lengths):
                starts.append(out.start_logits[row, :n].float().cpu().numpy())
                ends.append(out.end_logits[row, :n].float().cpu().numpy())
    return starts, ends


def _evaluate(model, examples: List[SquadExample], windows: List[QAWindow],
              opts: FinetuneQAOptions, version_2: bool, pad_id: int, device: torch.device,
              precision: str) -> Tuple[Dict[str, float], Dict[str, str], Dict[str, float]]:
    starts, ends = _predict(model, windows, opts, pad_id, device, precision)
    # The best span of every question, whatever its null score; thresholds applied below.
    spans, null_diffs = extract_answers(
        examples, windows, starts, ends, n_best=opts.n_best, max_answer_len=opts.max_answer_len,
        version_2=version_2, null_score_diff_threshold=math.inf)
    predictions = (_with_null_threshold(spans, null_diffs, opts.null_score_diff_threshold)
                   if version_2 else spans)
    metrics = evaluate_predictions(examples, predictions)
    if version_2 and opts.tune_null_threshold:
        for metric, name in (("exact_match", "best_exact"), ("f1", "best_f1")):
            metrics[name], metrics[f"{name}_thresh"] = best_null_threshold(
                examples, spans, null_diffs, metric)
        predictions = _with_null_threshold(spans, null_diffs, metrics["best_f1_thresh"])
    return metrics, predictions, null_diffs


def _with_null_threshold(spans: Dict[str, str], null_diffs: Dict[str, float],
                         threshold: float) -> Dict[str, str]:
    """"" for every question whose null score - best span score exceeds ``threshold``."""
    return {qid: ("" if null_diffs.get(qid, math.inf) > threshold else text)
            for qid, text in spans.items()}


def _selection_metric(opts: FinetuneQAOptions, version_2: bool) -> str:
    """The dev metric that picks the best evaluation (run_squad.py's --eval_metric of the
    original README: f1 for SQuAD 1.1, best_f1 for 2.0)."""
    return "best_f1" if version_2 and opts.tune_null_threshold else "f1"


def _format_metrics(metrics: Dict[str, float]) -> str:
    text = f"EM {metrics['exact_match']:.2f}  F1 {metrics['f1']:.2f}  ({metrics['total']} questions"
    if "best_f1" in metrics:
        text += (f"; tuned no-answer threshold {metrics['best_f1_thresh']:.3f}: best EM "
                 f"{metrics['best_exact']:.2f} best F1 {metrics['best_f1']:.2f}")
    if "HasAns_total" in metrics:
        text += (f"; answerable EM {metrics['HasAns_exact']:.2f} F1 {metrics['HasAns_f1']:.2f}, "
                 f"unanswerable EM {metrics['NoAns_exact']:.2f}")
    return text + ")"


def _load_qa_tokenizer(opts: FinetuneQAOptions) -> WordPieceTokenizer:
    """--tokenizer, else the --model directory's tokenizer; the original SpanBERT release
    has none (its tarball holds config.json and pytorch_model.bin only), so say what to
    pass instead of only that the file is missing."""
    if opts.tokenizer is not None:
        return load_tokenizer(opts.tokenizer)
    if not os.path.exists(opts.model):  # the same message load_qa_model gives
        raise InputError(f"--model {opts.model!r} does not exist")
    try:
        return load_tokenizer(opts.model)
    except InputError as err:
        raise InputError(f"{err}: --model has no tokenizer; the original SpanBERT release "
                         f"ships none, so pass --tokenizer with BERT's cased vocabulary "
                         f"(bert-base-cased's vocab.txt, 28996 entries)") from None


def _load_split(path: str, tokenizer: WordPieceTokenizer, opts: FinetuneQAOptions,
                max_seq_len: int, for_training: bool, name: str):
    examples, has_impossible = read_squad(path)
    windows, stats = build_windows(examples, tokenizer, max_seq_len=max_seq_len,
                                   doc_stride=opts.doc_stride, max_query_len=opts.max_query_len,
                                   for_training=for_training)
    note = ""
    skipped = stats.answer_not_in_context + stats.empty_context
    if skipped:
        note = (f"; skipped {skipped} question(s) whose answer is not in the context "
                f"(first: {stats.skipped_ids[0]})")
    _say(opts, f"{name}: {len(examples)} questions -> {len(windows)} windows of <= "
               f"{max_seq_len} tokens{note}")
    if for_training and not windows:
        raise InputError(f"--train {path!r} yields no training window")
    return examples, windows, has_impossible


def run_finetune_qa(opts: FinetuneQAOptions) -> FinetuneQAResult:
    """Fine-tune on ``opts.train`` (if given), evaluate on ``opts.dev`` after every epoch
    (if given), and write the model, tokenizer, predictions and metrics to ``opts.out``
    (if given). Raises :class:`InputError` for unusable input."""
    if opts.train is None and opts.dev is None:
        raise InputError("give --train, --dev or both")
    for name in ("batch_size", "eval_batch_size", "n_best", "max_answer_len"):
        if getattr(opts, name) <= 0:
            raise InputError(f"--{name.replace('_', '-')} must be positive, got "
                             f"{getattr(opts, name)}")
    for name in ("epochs", "lr"):
        check_positive(name, getattr(opts, name))
    check_regularisation(opts.max_grad_norm, opts.weight_decay)
    if isinstance(opts.eval_per_epoch, bool) or not isinstance(opts.eval_per_epoch, int) \
            or opts.eval_per_epoch < 1:
        raise InputError(f"--eval-per-epoch must be a positive integer (use --no-eval-each-epoch "
                         f"to evaluate only at the end), got {opts.eval_per_epoch!r}")
    if not 0.0 <= opts.warmup_ratio < 1.0:
        raise InputError(f"--warmup-ratio must be in [0, 1), got {opts.warmup_ratio}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise InputError("finetune-qa runs in one process; launch it without torchrun")
    _check_out(opts)
    device = resolve_device(opts.device)
    precision = resolve_precision(opts.precision, device)
    check_backend(opts.backend, device)
    tokenizer = _load_qa_tokenizer(opts)
    seed_everything(opts.seed)
    model, fresh_head = load_qa_model(opts.model, backend=opts.backend)
    config = model.config
    if tokenizer.vocab_size > config.vocab_size:
        raise InputError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model "
                         f"{opts.model!r} only {config.vocab_size}: they do not belong together")
    if opts.max_seq_len is not None and opts.max_seq_len < 8:  # 0 is not "the default"
        raise InputError(f"--max-seq-len must be in [8, {config.max_position_embeddings}] (the "
                         f"model's max_position_embeddings), got {opts.max_seq_len}")
    max_seq_len = opts.max_seq_len or min(512, config.max_position_embeddings)
    if not 8 <= max_seq_len <= config.max_position_embeddings:
        raise InputError(f"--max-seq-len must be in [8, {config.max_position_embeddings}] (the "
                         f"model's max_position_embeddings), got {max_seq_len}")

    train = dev = None
    if opts.train is not None:
        train = _load_split(opts.train, tokenizer, opts, max_seq_len, True, "train")
    if opts.dev is not None:
        dev = _load_split(opts.dev, tokenizer, opts, max_seq_len, False, "dev")
    version_2 = opts.version_2
    if version_2 is None:
        version_2 = any(split is not None and split[2] for split in (train, dev))
    _say(opts, f"model: {opts.model} ({config.num_hidden_layers} layers, hidden "
               f"{config.hidden_size}{'; new QA head' if fresh_head else ''}); {device.type}, "
               f"{precision}; SQuAD {'v2.0 (unanswerable questions)' if version_2 else 'v1.1'}")
    model.to(device)
    result = FinetuneQAResult()
    pad_id = tokenizer.pad_id

    if train is not None and opts.out is None:  # said once the input is known to be usable
        print("spanbert-fast: warning: no --out: the fine-tuned model will not be saved",
              file=sys.stderr, flush=True)
    if train is not None:
        _, windows, _ = train
        batches_per_epoch = -(-len(windows) // opts.batch_size)
        total_steps = max(1, round(batches_per_epoch * opts.epochs))
        optimizer = torch.optim.AdamW(adamw_parameter_groups(model, opts.weight_decay), lr=opts.lr)
        scheduler = warmup_then_decay(optimizer, round(opts.warmup_ratio * total_steps),
                                      total_steps)
        scaler = make_grad_scaler(precision, device)
        generator = torch.Generator().manual_seed(opts.seed)
        progress = None
        if opts.progress:
            from tqdm import tqdm
            progress = tqdm(total=total_steps, desc="finetune-qa", unit="step",
                            dynamic_ncols=True, file=sys.stderr, mininterval=0.5)
        # Dev evaluations every eval_step batches of an epoch, as run_squad.py does.
        evaluating = dev is not None and opts.eval_each_epoch
        eval_step = max(1, batches_per_epoch // opts.eval_per_epoch)
        selection = _selection_metric(opts, version_2)
        best: Optional[Dict[str, Any]] = None  # the best evaluation and its weights (CPU)
        step, epoch = 0, 0
        try:
            while step < total_steps:
                epoch += 1
                model.train()
                order = torch.randperm(len(windows), generator=generator).tolist()
                losses = []
                last_metrics: Optional[Dict[str, float]] = None
                started = time.perf_counter()
                for batch_index, batch in enumerate(
                        _batches(windows, order, opts.batch_size, pad_id, device, True)):
                    if step >= total_steps:
                        break
                    with autocast(device, precision):
                        loss = model(**batch).loss
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    if opts.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), opts.max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(loss.item())
                    step += 1
                    if progress is not None:
                        progress.set_postfix_str(f"loss {losses[-1]:.3f}", refresh=False)
                        progress.update(1)
                    if evaluating and (batch_index + 1) % eval_step == 0:
                        last_metrics, _, _ = _evaluate(model, dev[0], dev[1], opts, version_2,
                                                       pad_id, device, precision)
                        model.train()
                        improved = (best is None or
                                    last_metrics[selection] > best["metrics"][selection])
                        result.evaluations.append({"step": step, "epoch": epoch,
                                                   "metrics": last_metrics, "best": improved})
                        if improved and opts.keep_best:
                            best = {"step": step, "metrics": last_metrics, "weights": {
                                k: v.detach().to("cpu", copy=True)
                                for k, v in model.state_dict().items()}}
                        elif improved:
                            best = {"step": step, "metrics": last_metrics}
                        mark = "  [best]" if improved else ""
                        _say(opts, f"step {step} (epoch {epoch}): dev "
                                   f"{_format_metrics(last_metrics)}{mark}")
                record: Dict[str, Any] = {"epoch": epoch, "steps": step,
                                          "train_loss": float(np.mean(losses)),
                                          "seconds": time.perf_counter() - started}
                message = f"epoch {epoch}: train loss {record['train_loss']:.4f}"
                if last_metrics is not None:  # the epoch's last evaluation
                    record.update({"exact_match": last_metrics["exact_match"],
                                   "f1": last_metrics["f1"]})
                result.epochs.append(record)
                _say(opts, message)
        finally:
            if progress is not None:
                progress.close()
        if best is not None and "weights" in best:
            model.load_state_dict(best["weights"])
            result.best_step = best["step"]
            _say(opts, f"kept the best dev evaluation's weights: step {best['step']}, "
                       f"{selection} {best['metrics'][selection]:.2f}")

    null_diffs: Dict[str, float] = {}
    if dev is not None:
        result.metrics, result.predictions, null_diffs = _evaluate(
            model, dev[0], dev[1], opts, version_2, pad_id, device, precision)
        # The one result of the run, always printed: under --quiet too (which hid it), and
        # after in-training evaluations, whose last one need not be at the last step.
        print("dev " + _format_metrics(result.metrics), file=sys.stdout, flush=True)
    if opts.out is not None:
        _save_outputs(opts, model, tokenizer, result, null_diffs, version_2)
    return result


def _save_outputs(opts: FinetuneQAOptions, model, tokenizer: WordPieceTokenizer,
                  result: FinetuneQAResult, null_diffs: Dict[str, float], version_2: bool) -> None:
    from ..io import atomic_write

    def write_json(name: str, values: Any) -> None:
        text = json.dumps(values, indent=2, ensure_ascii=False) + "\n"

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(text)
        atomic_write(os.path.join(opts.out, name), write)

    os.makedirs(opts.out, exist_ok=True)
    if opts.train is not None:
        model.save_pretrained(opts.out)
        tokenizer.save(opts.out)
    if result.predictions is not None:
        write_json("predictions.json", result.predictions)
        if version_2:  # JSON has no infinity: null for questions without a candidate span
            write_json("null_odds.json", {k: (v if math.isfinite(v) else None)
                                          for k, v in null_diffs.items()})
        write_json("eval_results.json", {"metrics": result.metrics, "epochs": result.epochs,
                                         "evaluations": result.evaluations,
                                         "best_step": result.best_step})
    _say(opts, f"wrote {opts.out}")
