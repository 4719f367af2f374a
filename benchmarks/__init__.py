"""spanbert_fast's benchmark suite (installed as ``spanbert_fast.benchmarks``).

``python -m benchmarks`` (from the repository root) or ``spanbert-fast bench`` runs every
registered case on this machine's best device (CUDA with the Triton backend where a kernel
exists, else CPU with the torch backend; never the Triton interpreter), prints a table and
writes ``benchmarks/results/<device>-<date>.{json,md}`` plus PNG plots. ``--compare
BASELINE.json`` turns it into a regression gate on ratios to in-run references.

Modules: :mod:`.registry` (what a case is; how to add one), :mod:`.cases` (the cases),
:mod:`.formulas` (FLOP/byte counts), :mod:`.timing` (timers and ceilings),
:mod:`.runner` (runs cases into a result document), :mod:`.schema` (the JSON format),
:mod:`.report` (table, Markdown, plots), :mod:`.compare` (the gate), :mod:`.cli`.
``test_perf.py`` holds the pytest-benchmark tests (``pytest benchmarks/``).
"""

from .cli import main
from .registry import CASES, Case, Instance, Shape, register_case, select_cases
from .runner import run_suite

__all__ = ["main", "run_suite", "CASES", "Case", "Instance", "Shape", "register_case",
           "select_cases"]
