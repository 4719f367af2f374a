"""Command line of the suite: ``python -m benchmarks`` and ``spanbert-fast bench``.

Exit status: 0 done (and no regression); 1 the regression gate failed; 2 bad arguments or
a refused environment (TRITON_INTERPRET=1, a device this machine lacks, a --compare
baseline of another device, model size or dtype: refused before any timing); 3 some rows
raised (the outputs are still written).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional, Sequence, Tuple

from .compare import compare_results, incomparable_settings, parse_max_regression
from .registry import CASES, GROUPS, select_cases
from .report import format_table, write_outputs
from .runner import run_suite
from .schema import load_result
from .settings import (DEFAULT_SHAPES, DTYPES, MODELS, InterpreterRefused, SuiteSettings,
                       describe_device,
                       default_quick, refuse_triton_interpreter, resolve_device)

__all__ = ["build_parser", "settings_from_args", "main"]

DEFAULT_OUT = os.path.join("benchmarks", "results")


def _positive_ints(text: str) -> List[int]:
    values = []
    for part in text.replace(",", " ").split():
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected positive integers, got {part!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected positive integers, got {value}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("expected at least one positive integer")
    return values


def _max_regression(text: str) -> float:
    try:
        return parse_max_regression(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    shapes = "; ".join(f"{dev}{' --quick' if quick else ''}: seq {' '.join(map(str, v['seqs']))}, "
                       f"batch {' '.join(map(str, v['batches']))}"
                       for (dev, quick), v in DEFAULT_SHAPES.items())
    parser = argparse.ArgumentParser(
        prog=prog or "python -m benchmarks",
        description="Benchmark spanbert_fast against its reference and its peers "
                    "(transformers, stock torch) on this machine's best device, write "
                    "<out>/<device>-<date>.json/.md/.png, and optionally gate on regressions.",
        epilog=f"Cases: {', '.join(CASES)}. Groups: {', '.join(GROUPS)}. Default shapes: "
               f"{shapes}. Exit status: 0 ok, 1 regression, 2 bad arguments or refused "
               "environment, 3 some rows failed.")
    parser.add_argument("--model", choices=sorted(MODELS), default="base",
                        help="model size whose shapes every case uses (default: base)")
    parser.add_argument("--seq", type=_positive_ints, nargs="+", metavar="N",
                        help="sequence lengths, e.g. --seq 128 512 (default: per device, below)")
    parser.add_argument("--batch", type=_positive_ints, nargs="+", metavar="N",
                        help="batch sizes (default: per device, below)")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="compute dtype (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--ops", metavar="LIST",
                        help="comma-separated cases and/or groups to run (default: all), "
                             "e.g. --ops attention,layer_norm or --ops encoder")
    parser.add_argument("--quick", action=argparse.BooleanOptionalAction, default=None,
                        help="shorter timing and smaller default shapes (default: on when the "
                             "run is on CPU, off on CUDA; --no-quick forces a full run)")
    parser.add_argument("--out", metavar="DIR", default=DEFAULT_OUT,
                        help=f"output directory (default: {DEFAULT_OUT})")
    parser.add_argument("--compare", metavar="BASELINE.json",
                        help="fail (exit 1) when a row's time ratio to its in-run speed "
                             "reference grew by more than --max-regression over the baseline's")
    parser.add_argument("--max-regression", type=_max_regression, default=0.10, metavar="LIMIT",
                        help="allowed growth of a row's ratio, as 10%% or 0.1 (default: 10%%)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA if present, else CPU), cpu, cuda or cuda:N "
                             "(default: auto)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random input")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    return parser


def settings_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace,
                       argv: Sequence[str] = ()) -> Tuple[SuiteSettings, Optional[dict]]:
    """Resolve defaults and check the arguments against each other and the machine;
    ``parser.error`` (exit 2, naming the option) on anything wrong. Returns the settings and
    the loaded baseline (None without ``--compare``)."""
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        parser.error(f"argument --device: {err}")
    quick = default_quick(device) if args.quick is None else args.quick
    defaults = DEFAULT_SHAPES[(device.type, quick)]
    seqs = tuple(v for group in args.seq for v in group) if args.seq else defaults["seqs"]
    batches = tuple(v for group in args.batch for v in group) if args.batch else defaults["batches"]
    dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if device.type == "cpu" and dtype == "fp16":
        parser.error("argument --dtype: fp16 is not benchmarked on CPU (use fp32 or bf16)")
    config = MODELS[args.model]()
    too_long = [s for s in seqs if s > config.max_position_embeddings]
    if too_long:
        parser.error(f"argument --seq: {too_long} longer than the {args.model} model's "
                     f"max_position_embeddings ({config.max_position_embeddings})")
    try:
        cases = select_cases(args.ops.split(",") if args.ops is not None else None)
    except ValueError as err:
        parser.error(f"argument --ops: {err}")
    baseline = None
    if args.compare is None and any(a.split("=", 1)[0] == "--max-regression" for a in argv):
        parser.error("argument --max-regression: only meaningful with --compare BASELINE.json")
    if args.compare is not None:
        if not os.path.isfile(args.compare):
            parser.error(f"argument --compare: no file {args.compare!r}")
        try:
            baseline = load_result(args.compare)
        except ValueError as err:
            parser.error(f"argument --compare: {err}")
    settings = SuiteSettings(
        device=device, model=args.model, dtype=dtype, seqs=tuple(dict.fromkeys(seqs)),
        batches=tuple(dict.fromkeys(batches)), cases=tuple(cases), quick=quick,
        out_dir=args.out, progress=not args.no_progress, plots=not args.no_plots,
        seed=args.seed, argv=list(argv))
    return settings, baseline


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Run the suite; returns the exit status (see the module docstring)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.list:
        for name, case in CASES.items():
            print(f"{name:22} {case.group:12} {case.description}")
        return 0
    try:
        refuse_triton_interpreter()
    except InterpreterRefused as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    settings, baseline = settings_from_args(parser, args, argv)
    if settings.device.type == "cpu":
        print(f"{parser.prog}: CPU run ({'quick' if settings.quick else 'full'}), torch backend "
              "only; Triton rows need a CUDA device.", file=sys.stderr)

    if baseline is not None:
        # Refuse a baseline that cannot be compared before minutes of timing, not after.
        errors = incomparable_settings(baseline, {
            "device": describe_device(settings.device),
            "settings": {"model": settings.model, "dtype": settings.dtype}})
        if errors:
            for error in errors:
                print(f"{parser.prog}: error: --compare: {error}", file=sys.stderr)
            return 2
    doc = run_suite(settings)
    for note in doc["notes"]:
        if note.startswith("WARNING"):
            print(f"{parser.prog}: {note}", file=sys.stderr)
    paths = write_outputs(doc, settings.out_dir, plots=settings.plots)
    print(format_table(doc))
    print()
    print("wrote " + ", ".join(p for p in paths.values() if p))
    print(f"wall time {doc['wall_time_s']:.0f} s")

    status = 0
    failed = [r for r in doc["rows"] if r["status"] == "error"]
    failed_cases = [c for c in doc["skipped_cases"] if c.get("error")]
    if failed or failed_cases:
        print(f"{len(failed)} row(s) and {len(failed_cases)} case(s) failed; see the "
              "tracebacks above", file=sys.stderr)
        status = 3
    if baseline is not None:
        comparison = compare_results(baseline, doc, args.max_regression)
        print()
        print(comparison.format())
        if not comparison.ok:
            status = 1
    return status
