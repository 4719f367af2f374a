"""Reading the files a user points the training commands at, with one-line errors.

Every problem with a user's file (missing, empty, not UTF-8, not the expected JSON)
raises :class:`InputError` whose message names the file and what is wrong with it; the
command line prints that message as ``spanbert-fast: error: ...`` and exits with status 2.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, List, Sequence

__all__ = ["InputError", "read_utf8", "read_json", "list_corpus_files", "check_positive",
           "check_in_range", "check_regularisation", "refuse_to_overwrite"]


class InputError(ValueError):
    """A user-supplied file or option cannot be used; the message is one line that says
    which and why."""


def read_utf8(path: str, what: str) -> str:
    """The text of ``path`` decoded as UTF-8 (a leading byte-order mark is dropped).

    ``what`` names the file's role in messages ("corpus file", "vocab file", ...).
    Raises :class:`InputError` when the file is missing, unreadable or not UTF-8, giving
    the byte offset and line of the first bad byte.
    """
    if not os.path.exists(path):
        raise InputError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise InputError(f"{what} {path!r} is a directory, expected a file")
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as err:
        raise InputError(f"cannot read {what} {path!r}: {err.strerror or err}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(
            f"{what} {path!r} is not valid UTF-8: byte 0x{data[err.start]:02x} at offset "
            f"{err.start} (line {line}); convert it first, e.g. "
            f"`iconv -f latin1 -t utf-8`") from None
    return text[1:] if text.startswith("\ufeff") else text


def read_json(path: str, what: str) -> Any:
    """Parse ``path`` as JSON; :class:`InputError` names the line and column of a syntax
    error."""
    text = read_utf8(path, what)
    if not text.strip():
        raise InputError(f"{what} {path!r} is empty")
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{what} {path!r} is not valid JSON: {err.msg} at line {err.lineno}, "
                         f"column {err.colno}") from None


def list_corpus_files(path: str) -> List[str]:
    """The corpus files under ``path``: the file itself, or every regular file below a
    directory (recursively, hidden files and directories skipped), sorted by path so the
    order, and with it the packed blocks, is the same on every machine."""
    if not os.path.exists(path):
        raise InputError(f"corpus {path!r} does not exist")
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise InputError(f"corpus {path!r} is neither a file nor a directory")
    found: List[str] = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, name) for name in files if not name.startswith("."))
    if not found:
        raise InputError(f"corpus directory {path!r} holds no files")
    return sorted(found)


def refuse_to_overwrite(directory: str, names: Sequence[str], what: str,
                        note: str = "") -> None:
    """Raise :class:`InputError` when ``--out directory`` already holds any of ``names``
    (files a run would replace), naming them; ``what`` says what they make up ("a
    model"), ``note`` is added after it. Called before anything is written."""
    present = [name for name in names if os.path.exists(os.path.join(directory, name))]
    if present:
        raise InputError(f"--out {directory!r} already holds {what}{note} "
                         f"({', '.join(present)}): pass --overwrite to replace it, or choose "
                         f"another directory")


# Command-line option checks shared by the commands: each raises InputError naming the option.
def check_positive(name: str, value: Any) -> None:
    # "not > 0" also refuses NaN, which "<= 0" lets through.
    if value is None or not value > 0 or not math.isfinite(value):
        raise InputError(f"--{name.replace('_', '-')} must be positive, got {value}")


def check_in_range(name: str, value: float, low: float, high: float, high_open: bool = False) -> None:
    """``low <= value <= high`` (``< high`` if ``high_open``); NaN is refused."""
    ok = low <= value and (value < high if high_open else value <= high)
    if not ok:
        bracket = ")" if high_open else "]"
        raise InputError(f"--{name.replace('_', '-')} must be in [{low}, {high}{bracket}, "
                         f"got {value}")


def check_regularisation(max_grad_norm: float, weight_decay: float) -> None:
    """--max-grad-norm (0 = no clipping) and --weight-decay: finite and >= 0."""
    for name, value in (("max_grad_norm", max_grad_norm), ("weight_decay", weight_decay)):
        if not (value >= 0 and math.isfinite(value)):
            raise InputError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
