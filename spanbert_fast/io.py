"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

Every file spanbert_fast writes for a user (checkpoints, configs, tokenizer files, training
state, results) goes through :func:`atomic_write` or :func:`atomic_write_all`.
"""

from __future__ import annotations

import os
import tempfile
from typing import Callable

__all__ = ["atomic_write", "atomic_write_all"]


def _write_temp(path: str, write: Callable[[str], None]) -> str:
    """Run ``write(tmp)`` on a temporary file beside ``path``, give it ordinary permissions,
    flush it to disk and return its name; on any failure the temporary file is removed."""
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp creates 0600; give the file the mode a plain open() would (0666 & ~umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        # Durable before it is renamed over the previous file: after a crash the name
        # points at the old contents or the complete new ones, never at an empty file.
        fd = os.open(tmp, os.O_RDWR)  # Windows refuses fsync on a read-only descriptor
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write_all(files: "list[tuple[str, Callable[[str], None]]]") -> None:
    """Write every ``(path, write)`` to a temporary file first, and only when all were
    written rename them into place, in order. A failure while writing leaves every previous
    file intact and no temporary file behind. The renames themselves are not one atomic
    step: a crash between two of them leaves the earlier files new and the later ones old."""
    temps: "list[tuple[str, str]]" = []
    try:
        for path, write in files:
            if os.path.exists(path) and not os.path.isfile(path):
                # A device or pipe (--json /dev/null): written to, never replaced by a
                # regular file (renaming over /dev/null would break it for everyone).
                write(path)
                continue
            temps.append((_write_temp(path, write), path))
    except BaseException:
        for tmp, _ in temps:
            _unlink_quietly(tmp)
        raise
    done = 0
    try:
        for tmp, path in temps:
            os.replace(tmp, path)
            done += 1
    except BaseException:
        for tmp, _ in temps[done:]:
            _unlink_quietly(tmp)
        raise


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Run ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``.

    The rename is atomic on POSIX and Windows, so readers see the old file or the new one,
    never half of one; on any failure the temporary file is removed and ``path`` is intact.
    """
    atomic_write_all([(path, write)])
