"""Paths users hand us: destinations checked before any work starts, files written whole or not at all,
and every OS error on a path turned into one message that says what is wrong and what to do.

    out = writable_file(args.out, "--out")          # before minutes of work, not after
    atomic_write(out, lambda tmp: fig.savefig(tmp), "--confusion")
    raise path_error(e, path, "--out")              # an OSError, explained (vitcli.errors)
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Callable
from pathlib import Path

from vitcli.errors import VitError, named, path_error

def _nearest_existing(path: Path) -> Path:
    """path itself, or its closest ancestor that exists (a file there blocks every folder below it)."""
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate
    return Path(".")


def _check_creatable(path: Path, what: str) -> None:
    """Refuse a path whose folders cannot be created or written: a file on the way, no permission,
    a read-only file system."""
    base = _nearest_existing(path.parent)
    if not base.is_dir():
        raise VitError(f"{named(what, path)}: {base} is a file, so no folder can be made inside it. Choose another path.")
    if not os.access(base, os.W_OK | os.X_OK):
        e = OSError(errno.EROFS if _read_only(base) else errno.EACCES, "")
        raise path_error(e, path, what)


def _read_only(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def writable_file(path: str | os.PathLike, what: str) -> Path:
    """A file destination that can be written, checked before any work: not a folder, no file on the
    way, permission, a writable file system. The folders it needs are created later, by the writer."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise VitError(f"{named(what, path)} is a folder; pass a file name.")
    _check_creatable(path, what)
    if path.exists() and not os.access(path, os.W_OK):
        raise path_error(OSError(errno.EACCES, ""), path, what)
    return path


def writable_dir(path: str | os.PathLike, what: str) -> Path:
    """A folder destination that exists and is writable, or can be created."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise VitError(f"{named(what, path)} is a file, not a folder. Choose another path.")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise path_error(OSError(errno.EROFS if _read_only(path) else errno.EACCES, ""), path, what)
        return path
    _check_creatable(path, what)
    return path


def make_dirs(path: str | os.PathLike, what: str = "") -> Path:
    """mkdir -p, with a clear message instead of an OSError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise path_error(e, path, what) from e
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object], what: str = "") -> Path:
    """Create the folders, call write(tmp) on a temporary name beside `path`, then rename it into place:
    a reader (or a full disk) never leaves half a file at `path`. Any OSError becomes a VitError."""
    path = Path(path).expanduser()
    make_dirs(path.parent, what)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")  # keeps the suffix: writers pick formats by it
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise path_error(e, path, what) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | os.PathLike, text: str, what: str = "") -> Path:
    """atomic_write of a text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text), what)


class _KeepWriteErrors(io.RawIOBase):
    """A file torch's zip writers write through, keeping the OSError they turn into a bare RuntimeError
    ("unexpected pos ...", "iostream error"): a full disk then reads as one."""

    def __init__(self, file):
        super().__init__()
        self.file, self.error = file, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.file.flush()

    def seekable(self) -> bool:  # torch.export.save's archive writer seeks back to patch headers
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()


def write_through(path: Path, save: Callable[[io.RawIOBase], object]) -> None:
    """save(file) into path (torch.save, torch.export.save), its write errors raised as the OSError they are."""
    with open(path, "wb") as f:
        writer = _KeepWriteErrors(f)
        try:
            save(writer)
        except RuntimeError as e:
            if writer.error is not None:
                raise writer.error from e
            raise
