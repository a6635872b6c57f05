"""Reading user text files tolerantly, and writing our own files atomically."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

log = logging.getLogger(__name__)


class InputError(Exception):
    """Bad user input (files, flags): reported as one line, exit code 2, no traceback."""


def decode_lines(raw_lines: Iterable[bytes], name: str) -> Iterator[str]:
    """UTF-8 lines without their newline; invalid bytes become U+FFFD with a warning.

    A translation tool must not stop at one bad byte in line 9,000 of a user file,
    nor silently change it: the warning names the file and the line. A byte-order mark
    at the start of the file (as some Windows editors write) is dropped: it is not text.
    Lines end at "\n" only (as `wc -l` counts them, so outputs stay aligned with
    references); a "\r" before it is dropped, and one inside a line (a file with classic
    Mac line ends reads as one long line) is read as a space, with a warning.
    """
    for number, raw in enumerate(raw_lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            line = raw.decode("utf-8", errors="replace")
            log.warning("%s:%d: invalid UTF-8, bad bytes replaced by U+FFFD", name, number)
        if number == 1:
            line = line.removeprefix("\ufeff")
        line = line.rstrip("\r\n")
        if "\r" in line:
            log.warning("%s:%d: %d carriage return(s) inside the line read as spaces; lines end at "
                        "\\n only (for classic Mac line ends, convert with: tr '\\r' '\\n')",
                        name, number, line.count("\r"))
            line = line.replace("\r", " ")
        yield line


def read_lines(path: str | Path) -> list[str]:
    """All lines of a text file (see `decode_lines`); a missing file is an InputError."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return list(decode_lines(f, str(path)))
    except FileNotFoundError:
        raise InputError(f"file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"expected a file, got a directory: {path}") from None
    except PermissionError:
        raise InputError(f"cannot read {path}: permission denied") from None


def check_output_path(path: str | Path, flag: str = "--output") -> None:
    """Fail before any work if `path` cannot be written: a directory, or a folder we cannot create."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{flag} {path} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{flag} {path}: cannot create its folder ({e.strerror})") from None
    if not os.access(path.parent, os.W_OK):
        raise InputError(f"{flag} {path}: its folder {path.parent} is not writable")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Write to a temporary file beside `path`, fsync, then rename over `path`.

    A kill at any moment leaves either the old file or the complete new one under the
    final name, never half of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
