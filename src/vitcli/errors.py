"""The one error type users see: the CLI prints its message and exits with code 2."""

from __future__ import annotations

import difflib
import errno
import os
from collections.abc import Iterable


class VitError(Exception):
    """A user mistake (bad recipe, unknown model, missing file, offline hub, ...).

    The message must say what is wrong and what to do; the CLI prints it without a traceback.
    """

    exit_code = 2


class DiskFull(VitError):
    """A write failed because its disk (or quota) is full. What was written before is intact; a training
    run adds what its next checkpoint needs and the command that resumes it (`run_dir`)."""

    def __init__(self, message: str, path: str | os.PathLike, run_dir: str | os.PathLike | None = None):
        super().__init__(message)
        self.path = path
        self.run_dir = run_dir


FULL = (errno.ENOSPC, errno.EDQUOT)


def closest(word: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """Up to n choices that look like word, best first (for 'did you mean' hints)."""
    choices = list(choices)
    by_lower = {c.lower(): c for c in choices}
    hits = difflib.get_close_matches(word.lower(), list(by_lower), n=n, cutoff=0.5)
    return [by_lower[h] for h in hits]


def few_keys(keys: Iterable[str], n: int = 5) -> str:
    """'a, b, c (+7 more)': the first n names, for error messages."""
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """' Did you mean: a, b?' or '' when nothing is close."""
    hits = closest(word, choices)
    return f" Did you mean: {', '.join(hits)}?" if hits else ""


_REASONS = {
    errno.ENOSPC: ("the disk is full", "Free disk space or choose a path on another disk"),
    errno.EDQUOT: ("the disk quota is used up", "Free space or choose a path on another disk"),
    errno.EACCES: ("permission denied", "Choose a folder you can write to, or fix its permissions"),
    errno.EPERM: ("the operation is not permitted", "Choose a folder you can write to, or fix its permissions"),
    errno.EROFS: ("the file system is read-only", "Choose a path on a writable disk"),
    errno.ENOTDIR: ("part of the path is a file, not a folder", "Choose another path"),
    errno.EEXIST: ("part of the path is a file, not a folder", "Choose another path"),
    errno.EISDIR: ("it is a folder, not a file", "Pass a file name"),
    errno.ENOENT: ("a folder on the way does not exist", "Check the path"),
    errno.ENAMETOOLONG: ("the name is too long", "Choose a shorter path"),
}


_READ_FIXES = {
    errno.ENOENT: "Check the path",
    errno.EACCES: "Fix its permissions or pass another path",
    errno.EPERM: "Fix its permissions or pass another path",
    errno.EISDIR: "Pass a file, not a folder",
}


def named(what: str, path: str | os.PathLike) -> str:
    return f"{what} {path}" if what else str(path)


def path_error(e: OSError, path: str | os.PathLike, what: str = "", *, reading: bool = False) -> VitError:
    """One clear message for an OSError on `path` (what: the option or file kind, e.g. '--out')."""
    reason, fix = _REASONS.get(e.errno, (e.strerror or str(e), "Choose another path"))
    if reading:
        reason = "it does not exist" if e.errno == errno.ENOENT else reason
        fix = _READ_FIXES.get(e.errno, "Pass another path")
    message = f"{named(what, path)}: cannot {'read' if reading else 'write'} ({reason}). {fix}."
    return DiskFull(message, path) if e.errno in FULL and not reading else VitError(message)
