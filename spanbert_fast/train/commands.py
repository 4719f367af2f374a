"""The ``pretrain`` and ``finetune-qa`` subcommands of ``spanbert-fast``.

:func:`add_training_commands` registers both on an ``argparse`` subparsers object; each
subparser's ``handler`` default runs the command and returns its exit status: 0 on
success, 2 for unusable input (one line ``spanbert-fast: error: ...`` on stderr, no
traceback), 1 when writing the results fails, 130 on Ctrl-C. ``python -m
spanbert_fast.train.commands`` runs them without the main CLI.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Optional, Sequence

__all__ = ["add_training_commands", "main"]

PROG = "spanbert-fast"


def _error(message: str, status: int) -> int:
    # Under torchrun every process meets the same bad input; one message is enough.
    if os.environ.get("RANK", "0") == "0":
        print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def _guarded(run: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        from .input_files import InputError
        try:
            run(args)
        except InputError as err:
            return _error(str(err), 2)
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except OSError as err:  # e.g. the output directory is not writable, the disk is full
            where = f" {err.filename!r}" if getattr(err, "filename", None) else ""
            return _error(f"{err.strerror or err}{where}", 1)
        return 0
    return handler


# ---------------------------------------------------------------------------------------
# pretrain
# ---------------------------------------------------------------------------------------
def _run_pretrain(args: argparse.Namespace) -> None:
    from .pretraining import PretrainOptions, run_pretraining

    run_pretraining(PretrainOptions(
        corpus=args.corpus, out=args.out, max_steps=args.max_steps, vocab=args.vocab,
        train_tokenizer=args.train_tokenizer, lowercase=args.lowercase, config=args.config,
        seq_len=args.seq_len, batch_size=args.batch_size, grad_accum_steps=args.grad_accum_steps,
        lr=args.lr, warmup_steps=args.warmup_steps, lr_decay_power=args.lr_decay_power,
        weight_decay=args.weight_decay, adam_beta1=args.adam_betas[0],
        adam_beta2=args.adam_betas[1], adam_eps=args.adam_eps, max_grad_norm=args.max_grad_norm,
        mask_ratio=args.mask_ratio, geometric_p=args.geometric_p,
        max_span_words=args.max_span_words, precision=args.precision, device=args.device,
        backend=args.backend, seed=args.seed, save_every=args.save_every,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, log_every=args.log_every,
        progress=not args.quiet, overwrite=args.overwrite, random_tokens=args.random_tokens,
        weight_decay_params=args.weight_decay_params, long_sentences=args.long_sentences,
        mask_unk=args.mask_unk, sbo_special_boundaries=args.sbo_special_boundaries))


def _add_pretrain(subparsers) -> None:
    p = subparsers.add_parser(
        "pretrain", help="pretrain SpanBERT (span masking + SBO) on a plain-text corpus",
        description="Pretrain SpanBertForPreTraining on plain text: WordPiece tokenization, "
                    "[CLS] block [SEP] single-segment blocks, span masking, AdamW with linear "
                    "warm-up and decay. Launch with `torchrun --nproc_per_node=K` for "
                    "data-parallel training (gloo on CPU, NCCL on GPU).")
    data = p.add_argument_group("data")
    data.add_argument("--corpus", required=True, metavar="FILE_OR_DIR",
                      help="UTF-8 text, one sentence per line, blank lines between documents; "
                           "a directory is read recursively")
    vocab = data.add_mutually_exclusive_group()
    vocab.add_argument("--vocab", metavar="PATH",
                       help="BERT vocab.txt (or tokenizer.json, or a directory with either)")
    vocab.add_argument("--train-tokenizer", type=int, metavar="N",
                       help="train a WordPiece vocabulary of at most N tokens on the corpus "
                            "(not seeded: the trainer breaks frequency ties differently from "
                            "run to run; save it once and pass --vocab for repeatable runs)")
    data.add_argument("--lowercase", action="store_true",
                      help="lowercase and strip accents (uncased BERT); SpanBERT is cased")
    data.add_argument("--seq-len", type=int, metavar="N",
                      help="tokens per block with [CLS] and [SEP] (default: 512, or the "
                           "model's max_position_embeddings if smaller)")
    model = p.add_argument_group("model")
    model.add_argument("--config", default="base", metavar="tiny|base|large|config.json",
                       help="model size preset or a BERT config.json (vocab_size follows the "
                            "tokenizer) (default: base)")
    model.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"),
                       help="op backend (default: auto = Triton on CUDA, torch elsewhere)")
    opt = p.add_argument_group("optimization")
    opt.add_argument("--max-steps", type=int, required=True, help="optimizer steps in all")
    opt.add_argument("--batch-size", type=int, default=256,
                     help="global batch in blocks per optimizer step, over all processes and "
                          "accumulation steps (default: 256, as SpanBERT)")
    opt.add_argument("--grad-accum-steps", type=int, default=1,
                     help="micro-batches per optimizer step in each process (default: 1)")
    opt.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (default: 1e-4)")
    opt.add_argument("--warmup-steps", type=int,
                     help="linear warm-up steps (default: 10000, at most 10%% of --max-steps)")
    opt.add_argument("--lr-decay-power", type=float, default=1.0,
                     help="power of the polynomial decay to 0 after warm-up (default: 1, linear)")
    opt.add_argument("--weight-decay", type=float, default=0.01,
                     help="decoupled (AdamW) weight decay (default: 0.01)")
    opt.add_argument("--weight-decay-params", choices=("all", "weights"), default="all",
                     help="parameters that --weight-decay applies to: all (the original "
                          "SpanBERT release) or weights = not biases and LayerNorm (BERT's "
                          "convention) (default: all)")
    opt.add_argument("--adam-betas", type=float, nargs=2, default=(0.9, 0.999),
                     metavar=("BETA1", "BETA2"), help="(default: 0.9 0.999)")
    opt.add_argument("--adam-eps", type=float, default=1e-8, help="(default: 1e-8)")
    opt.add_argument("--max-grad-norm", type=float, default=1.0,
                     help="clip the gradient norm to this; 0 disables (default: 1.0)")
    opt.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                     help="autocast dtype: auto = bf16 on GPUs that have it, else fp16 with a "
                          "loss scaler; fp32 on CPU")
    opt.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    opt.add_argument("--seed", type=int, default=0, help="seeds the data order, the masking "
                     "and the weights (default: 0)")
    mask = p.add_argument_group("span masking")
    mask.add_argument("--mask-ratio", type=float, default=0.15, help="(default: 0.15)")
    mask.add_argument("--geometric-p", type=float, default=0.2,
                      help="span length in words ~ Geometric(p) (default: 0.2)")
    mask.add_argument("--max-span-words", type=int, default=10, help="(default: 10)")
    mask.add_argument("--random-tokens", choices=("unigram", "uniform"), default="unigram",
                      help="the 10%% random replacement tokens: drawn from the corpus's token "
                           "counts (unigram, the original) or uniformly over the vocabulary "
                           "minus special tokens (default: unigram)")
    mask.add_argument("--mask-unk", action=argparse.BooleanOptionalAction, default=True,
                      help="[UNK] may be masked like any token, as in the original "
                           "(default: on)")
    mask.add_argument("--sbo-special-boundaries", action="store_true",
                      help="also give SBO targets to spans next to [CLS]/[SEP] (the original "
                           "uses only spans with a real token on both sides)")
    data.add_argument("--long-sentences", choices=("drop", "cut"), default="drop",
                      help="a line longer than a block: drop it (the original; the count is "
                           "logged) or cut it into block-sized pieces (default: drop)")
    run = p.add_argument_group("checkpoints and logging")
    run.add_argument("--out", required=True, metavar="DIR",
                     help="output directory: checkpoint-STEP/ directories, the final model and "
                          "tokenizer, train_log.jsonl")
    run.add_argument("--save-every", type=int, default=1000,
                     help="write a checkpoint every N steps (default: 1000) and at the end")
    run.add_argument("--keep-checkpoints", type=int, default=2,
                     help="keep the N latest checkpoints (default: 2)")
    run.add_argument("--resume", metavar="DIR",
                     help="continue from a checkpoint (or the latest one in DIR) exactly as "
                          "the interrupted run would have; repeat the original options")
    run.add_argument("--log-every", type=int, default=10,
                     help="print a log line every N steps (default: 10)")
    run.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a model already in --out (refused without this)")
    p.set_defaults(handler=_guarded(_run_pretrain))


# ---------------------------------------------------------------------------------------
# finetune-qa
# ---------------------------------------------------------------------------------------
def _run_finetune_qa(args: argparse.Namespace) -> None:
    from .qa_finetuning import FinetuneQAOptions, run_finetune_qa

    version_2 = {"auto": None, "v1": False, "v2": True}[args.squad_version]
    run_finetune_qa(FinetuneQAOptions(
        model=args.model, train=args.train, dev=args.dev, out=args.out, tokenizer=args.tokenizer,
        epochs=args.epochs, batch_size=args.batch_size, eval_batch_size=args.eval_batch_size,
        lr=args.lr, warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, max_seq_len=args.max_seq_len,
        doc_stride=args.doc_stride, max_query_len=args.max_query_len,
        max_answer_len=args.max_answer_len, n_best=args.n_best, version_2=version_2,
        null_score_diff_threshold=args.null_score_diff_threshold,
        eval_each_epoch=args.eval_each_epoch, seed=args.seed,
        precision=args.precision, device=args.device, backend=args.backend,
        progress=not args.quiet, overwrite=args.overwrite, eval_per_epoch=args.eval_per_epoch,
        keep_best=args.keep_best, tune_null_threshold=args.tune_null_threshold))


def _add_finetune_qa(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune-qa", help="fine-tune and evaluate extractive QA on SQuAD v1.1/v2.0 JSON",
        description="Fine-tune SpanBertForQuestionAnswering on a SQuAD-format file and report "
                    "exact match and F1 as the official SQuAD evaluation computes them. The "
                    "defaults follow the original SpanBERT's SQuAD commands: 512-token windows, "
                    "stride 128, lr 2e-5, 4 epochs, batch 32, 10 dev evaluations per epoch "
                    "keeping the best (by F1; SQuAD 2.0: best_f1 with the no-answer threshold "
                    "tuned on dev).")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="checkpoint directory (from `pretrain`, a transformers BERT, or the "
                        "SpanBERT release); its tokenizer.json / vocab.txt is used")
    p.add_argument("--train", metavar="JSON", help="SQuAD-format training file")
    p.add_argument("--dev", metavar="JSON", help="SQuAD-format evaluation file")
    p.add_argument("--out", metavar="DIR",
                   help="write the fine-tuned model, tokenizer, predictions.json and "
                        "eval_results.json here")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="tokenizer.json / vocab.txt / directory (default: the --model "
                        "directory; the original SpanBERT release has no vocabulary: give "
                        "BERT's cased vocab.txt)")
    p.add_argument("--squad-version", choices=("auto", "v1", "v2"), default="auto",
                   help="v2 allows 'no answer' predictions (default: auto = v2 when the data "
                        "has is_impossible questions)")
    p.add_argument("--epochs", type=float, default=4.0, help="(default: 4)")
    p.add_argument("--batch-size", type=int, default=32, help="(default: 32)")
    p.add_argument("--eval-batch-size", type=int, default=64, help="(default: 64)")
    p.add_argument("--lr", type=float, default=2e-5, help="peak learning rate (default: 2e-5)")
    p.add_argument("--warmup-ratio", type=float, default=0.1,
                   help="share of the steps spent warming up (default: 0.1)")
    p.add_argument("--weight-decay", type=float, default=0.01, help="(default: 0.01)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="(default: 1.0; 0: no clip)")
    p.add_argument("--max-seq-len", type=int,
                   help="tokens per window (default: 512, or the model's limit if smaller)")
    p.add_argument("--doc-stride", type=int,
                   help="context tokens between the starts of consecutive windows (default: "
                        "128, or half of a window's context part if that is shorter)")
    p.add_argument("--max-query-len", type=int, default=64,
                   help="questions are cut to this many tokens (default: 64)")
    p.add_argument("--max-answer-len", type=int, default=30,
                   help="longest answer in tokens (default: 30)")
    p.add_argument("--n-best", type=int, default=20,
                   help="start and end candidates per window (default: 20)")
    p.add_argument("--null-score-diff-threshold", type=float, default=0.0,
                   help="v2: answer 'no answer' when null score - best span score exceeds "
                        "this; exact_match and f1 are reported at it (default: 0.0)")
    p.add_argument("--tune-null-threshold", action=argparse.BooleanOptionalAction, default=True,
                   help="v2: also report best_exact / best_f1 with the threshold tuned on "
                        "--dev, write it to eval_results.json and use it for the predictions "
                        "(default: on, as the original)")
    p.add_argument("--eval-each-epoch", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate on --dev during training (--eval-per-epoch times per "
                        "epoch), or only at the end")
    p.add_argument("--eval-per-epoch", type=int, default=10,
                   help="dev evaluations per epoch, every (batches per epoch // N) batches "
                        "(default: 10, as the original)")
    p.add_argument("--keep-best", action=argparse.BooleanOptionalAction, default=True,
                   help="end with the weights of the best dev evaluation (by f1; v2: best_f1) "
                        "rather than the last step's (default: on, as the original)")
    p.add_argument("--seed", type=int, default=42, help="(default: 42)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--quiet", action="store_true",
                   help="no progress bar or log lines (the final metrics line is printed)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a model or evaluation results already in --out (refused "
                        "without this)")
    p.set_defaults(handler=_guarded(_run_finetune_qa))


def add_training_commands(subparsers) -> None:
    """Register ``pretrain`` and ``finetune-qa`` on ``subparsers`` (from
    ``ArgumentParser.add_subparsers``). A parsed namespace's ``handler(namespace)`` runs the
    chosen command and returns the exit status."""
    _add_pretrain(subparsers)
    _add_finetune_qa(subparsers)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m spanbert_fast.train.commands pretrain|finetune-qa ...``: the two commands
    without the rest of the CLI. Returns the exit status (argparse exits 2 on bad usage)."""
    parser = argparse.ArgumentParser(prog=PROG)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_training_commands(subparsers)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
