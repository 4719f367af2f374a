"""The result file: ``<out>/<device-slug>-<YYYY-MM-DD>.json``.

Schema version 1. Top level (every key required)::

    schema_version  int    1
    suite           str    "spanbert_fast.benchmarks"
    created         str    ISO-8601 timestamp with offset
    date            str    YYYY-MM-DD (also in the file name)
    device          dict   type ("cpu" | "cuda"), name, slug (file-name form), and
                           threads (CPU) or memory_bytes / capability / cuda (GPU)
    versions        dict   python, torch, triton, transformers, numpy, spanbert_fast
                           (str, or null when not installed)
    settings        dict   model, dtype, seq [int], batch [int], cases [str], quick,
                           seed, argv [str]
    timer           str    how rows were timed
    ceilings        dict   matmul {dtype, n, flops_per_s}, matmul_run {same, in the run's
                           dtype: what compute-bound rows are compared with},
                           copy {bytes, bytes_per_s}
    rows            list   one per (case, mode, shape, variant), see below
    skipped_cases   list   {case, group, reason}: cases that could not run at all
    notes           list   str: how to read the numbers (a "WARNING: ..." first when the
                           machine was busy as the run started)
    wall_time_s     float  the whole run

Optional top level: ``load_average_at_start`` [1, 5, 15-minute] and
``cpu_busy_by_others_at_start`` (share of all CPUs other processes used in the 0.5 s
before a CPU run; null on GPU or where unknown).

A row (every key present; null where not applicable)::

    key                 str    "case|mode|model|dtype|shape_label|variant": what the
                               regression gate matches rows by
    case, group         str    registered case and its group (encoder, ops, ...)
    mode                str    "fwd" | "fwd+bwd"
    model, dtype        str    the run's --model and --dtype
    shape               dict   batch, seq, padded, plus case-specific sizes
    shape_label         str    "b<batch>-s<seq>-full|padded"
    variant             str    e.g. "ours-torch", "transformers-sdpa"
    status              str    "ok" | "skipped" | "error"
    reason              str    why skipped or what failed (null when ok)
    speed_reference     str    the variant this row's time is divided by
    is_reference        bool   this row is that variant
    time_s              float  median seconds per call               (ok rows)
    ratio_to_reference  float  median over timing rounds of (time / the reference's time
                               in the same round)                    (ok rows)
    ratio_round_spread  float  max / min - 1 of those per-round ratios (its noise; may be
                               absent from files written before it was added)
    tokens              int    real tokens (or rows) per call
    tokens_per_s        float
    flops, flops_per_s  float  useful FLOPs per call (benchmarks/formulas.py) and rate
    bytes, bytes_per_s  float  compulsory bytes per call and rate (memory-bound ops)
    bound               str    "compute" | "memory": which ceiling utilisation uses
    utilisation         float  rate / ceiling, 0..1 (can exceed 1 when caches help)
    parity_oracle       str    what parity compares with
    parity_error        float  max |row - oracle| / max |oracle| over real positions
    parity_finite       bool   false when the row or the oracle held NaN/inf
    peak_memory_bytes   int    CUDA only (null on CPU)

``.md`` beside it renders the same rows; ``-speedup.png`` (and ``-memory.png`` when peak
memory was measured) are the plots.
"""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List

from spanbert_fast.io import atomic_write

__all__ = ["SCHEMA_VERSION", "row_key", "validate_result", "check_result", "dump_result",
           "load_result", "write_atomically"]

SCHEMA_VERSION = 1

_NUMBER = (int, float)
_TOP_LEVEL = {
    "schema_version": int, "suite": str, "created": str, "date": str, "device": dict,
    "versions": dict, "settings": dict, "timer": str, "ceilings": dict, "rows": list,
    "skipped_cases": list, "notes": list, "wall_time_s": _NUMBER,
}
_ROW_REQUIRED = {
    "key": str, "case": str, "group": str, "mode": str, "model": str, "dtype": str,
    "shape": dict, "shape_label": str, "variant": str, "status": str,
    "speed_reference": str, "is_reference": bool, "tokens": int, "bound": str,
    "parity_oracle": str,
}
# Keys added to schema version 1 after its first files were written: a row may lack them.
_ROW_ADDED_LATER = ("ratio_round_spread",)
# Present on every row; null allowed (always null on skipped/error rows).
_ROW_OPTIONAL = {
    "reason": str, "time_s": _NUMBER, "ratio_to_reference": _NUMBER, "tokens_per_s": _NUMBER,
    "flops": _NUMBER, "flops_per_s": _NUMBER, "bytes": _NUMBER, "bytes_per_s": _NUMBER,
    "utilisation": _NUMBER, "parity_error": _NUMBER, "parity_finite": bool,
    "ratio_round_spread": _NUMBER,
    "peak_memory_bytes": int,
}


def row_key(row: Dict[str, Any]) -> str:
    """The identity of a row across runs: everything but the measurements."""
    return "|".join(str(row[k]) for k in ("case", "mode", "model", "dtype", "shape_label", "variant"))


def _type_name(expected) -> str:
    if isinstance(expected, tuple):
        return " or ".join(t.__name__ for t in expected)
    return expected.__name__


def _check(where: str, value: Any, expected, problems: List[str]) -> None:
    ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
    if expected is _NUMBER and isinstance(value, bool):
        ok = False
    if not ok:
        problems.append(f"{where}: expected {_type_name(expected)}, got {type(value).__name__}")
    elif isinstance(value, float) and not math.isfinite(value):
        problems.append(f"{where}: must be finite, got {value}")


def validate_result(doc: Any) -> List[str]:
    """Problems with a result document (empty list: it is valid schema version 1)."""
    problems: List[str] = []
    if not isinstance(doc, dict):
        return [f"result must be a JSON object, got {type(doc).__name__}"]
    for key, expected in _TOP_LEVEL.items():
        if key not in doc:
            problems.append(f"missing top-level key {key!r}")
        else:
            _check(key, doc[key], expected, problems)
    if problems:
        return problems
    if doc["schema_version"] != SCHEMA_VERSION:
        problems.append(f"schema_version {doc['schema_version']} is not {SCHEMA_VERSION}")
    for key in ("type", "name", "slug"):
        if not isinstance(doc["device"].get(key), str):
            problems.append(f"device.{key}: expected str")
    for key, field in (("matmul", "flops_per_s"), ("matmul_run", "flops_per_s"),
                       ("copy", "bytes_per_s")):
        value = doc["ceilings"].get(key, {}).get(field)
        if not isinstance(value, _NUMBER) or isinstance(value, bool) or not math.isfinite(value) \
                or value <= 0:
            problems.append(f"ceilings.{key}.{field}: expected a finite positive number, "
                            f"got {value!r}")
    seen_keys: Dict[str, int] = {}
    for i, row in enumerate(doc["rows"]):
        where = f"rows[{i}]"
        if not isinstance(row, dict):
            problems.append(f"{where}: expected an object")
            continue
        for key, expected in _ROW_REQUIRED.items():
            if key not in row:
                problems.append(f"{where}: missing {key!r}")
            else:
                _check(f"{where}.{key}", row[key], expected, problems)
        for key, expected in _ROW_OPTIONAL.items():
            if key not in row:
                if key not in _ROW_ADDED_LATER:
                    problems.append(f"{where}: missing {key!r} (null allowed)")
            elif row[key] is not None:
                _check(f"{where}.{key}", row[key], expected, problems)
        status = row.get("status")
        if status not in ("ok", "skipped", "error"):
            problems.append(f"{where}.status: expected ok, skipped or error, got {status!r}")
        elif status == "ok":
            for key in ("time_s", "tokens_per_s"):
                if row.get(key) is None:
                    problems.append(f"{where}.{key}: required on an ok row")
        elif not row.get("reason"):
            problems.append(f"{where}.reason: required on a {status} row")
        if row.get("mode") not in ("fwd", "fwd+bwd"):
            problems.append(f"{where}.mode: expected fwd or fwd+bwd, got {row.get('mode')!r}")
        if isinstance(row.get("key"), str) and all(k in row for k in ("case", "mode", "model",
                                                                        "dtype", "shape_label",
                                                                        "variant")):
            if row["key"] != row_key(row):
                problems.append(f"{where}.key: {row['key']!r} does not match its fields")
        if isinstance(row.get("key"), str):
            # One row per key: the gate looks rows up by key, so a duplicate could hide one.
            if row["key"] in seen_keys:
                problems.append(f"{where}.key: {row['key']!r} repeats rows[{seen_keys[row['key']]}]")
            else:
                seen_keys[row["key"]] = i
        if isinstance(row.get("shape"), dict):
            for name, value in row["shape"].items():
                if not isinstance(value, (int, bool, str)):
                    problems.append(f"{where}.shape.{name}: expected int, bool or str, got "
                                    f"{type(value).__name__}")
        if row.get("status") == "ok" and row.get("is_reference") is True \
                and row.get("ratio_to_reference") not in (None, 1.0):
            problems.append(f"{where}.ratio_to_reference: a reference row's ratio is 1.0, got "
                            f"{row['ratio_to_reference']}")
    return problems


def _complete_rows(doc: Dict[str, Any]) -> None:
    """Give every row every optional key (null when absent), so files are uniform."""
    for row in doc.get("rows", []):
        for key in _ROW_OPTIONAL:
            row.setdefault(key, None)


def check_result(doc: Dict[str, Any]) -> None:
    """Complete ``doc``'s rows and raise ``ValueError`` listing what breaks the schema."""
    _complete_rows(doc)
    problems = validate_result(doc)
    if problems:
        raise ValueError("benchmark result does not match schema version "
                         f"{SCHEMA_VERSION}:\n  " + "\n  ".join(problems[:20]))


def dump_result(doc: Dict[str, Any], path: str) -> None:
    """Write ``doc`` as strict JSON (no NaN/inf) after checking it against the schema, to a
    temporary file renamed over ``path``: a failure leaves any previous file intact."""
    check_result(doc)
    text = json.dumps(doc, indent=1, allow_nan=False) + "\n"
    write_atomically(path, lambda handle: handle.write(text.encode("utf-8")))


def write_atomically(path: str, write) -> None:
    """``write(binary_handle)`` into a temporary file beside ``path``, then rename it over
    ``path`` (the package's checkpoint writer: fsync'd, the temporary file removed on any
    failure)."""
    def write_file(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            write(handle)

    atomic_write(path, write_file)


def load_result(path: str) -> Dict[str, Any]:
    """Read and validate a result file; ``ValueError`` says what is wrong with it."""
    with open(path, "r", encoding="utf-8") as handle:
        try:
            doc = json.load(handle)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from None
    problems = validate_result(doc)
    if problems:
        raise ValueError(f"{path} is not a schema-version-{SCHEMA_VERSION} benchmark result:\n  "
                         + "\n  ".join(problems[:20]))
    return doc
