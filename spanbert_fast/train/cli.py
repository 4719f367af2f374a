"""The ``spanbert-fast`` command.

Subcommands:

``bench``        the benchmark suite (``spanbert-fast bench --help``); every argument after
                 ``bench`` goes to it unchanged, as ``python -m benchmarks`` would take it.
``audit``        the compile audit: every Triton kernel compiled for sm_80/sm_90/sm_100
                 without a GPU (``spanbert-fast audit --help``; ``python -m benchmarks.audit``).
``pretrain``,    SpanBERT pretraining and SQuAD fine-tuning, from
``finetune-qa``  :mod:`spanbert_fast.train.commands` (``spanbert-fast pretrain --help``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from typing import Optional, Sequence

__all__ = ["main"]


def _load_benchmarks():
    """The suite: installed as ``spanbert_fast.benchmarks`` (``package_dir`` maps the
    repository's ``benchmarks/`` there), or the top-level ``benchmarks`` package when run
    from a source checkout without installing."""
    try:
        installed = importlib.util.find_spec("spanbert_fast.benchmarks") is not None
    except ModuleNotFoundError:
        installed = False
    if installed:
        return importlib.import_module("spanbert_fast.benchmarks")
    try:
        return importlib.import_module("benchmarks")
    except ModuleNotFoundError as err:
        raise SystemExit(
            "spanbert-fast bench: the benchmark suite is not importable "
            f"({err}). Install the package (pip install -e . --no-build-isolation) or run "
            "from the repository root.") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spanbert-fast",
        description="spanbert_fast command line: a kernel-optimized SpanBERT encoder.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("bench", add_help=False,
                   help="run the benchmark suite (spanbert-fast bench --help for its options)")
    sub.add_parser("audit", add_help=False,
                   help="compile every Triton kernel for sm_80/sm_90/sm_100 without a GPU and "
                        "report registers, spills, shared memory (spanbert-fast audit --help)")
    from .commands import add_training_commands

    add_training_commands(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``spanbert-fast`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "bench":
        # Hand everything after "bench" to the suite's own parser, untouched.
        return int(_load_benchmarks().main(args[1:], prog="spanbert-fast bench") or 0)
    if args and args[0] == "audit":
        audit = importlib.import_module(_load_benchmarks().__name__ + ".audit")
        return int(audit.main(args[1:], prog="spanbert-fast audit") or 0)
    parser = _parser()
    parsed = parser.parse_args(args)  # exits 2 on an unknown command, 0 on --help
    if parsed.command is None:
        parser.print_help()
        return 2
    return int(parsed.handler(parsed))


if __name__ == "__main__":
    sys.exit(main())
