"""One training process per run directory: an OS file lock on RUN/.lock, held while the process trains.

The kernel drops a `flock` when its process dies, however it dies, so a killed run never leaves a stale
lock. The file also says who holds it (pid, host, start time) for the message a second process gets.
Commands that only read a run (eval, inspect, plot, predict, export) never take it.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from vitcli.errors import VitError
from vitcli.io.paths import make_dirs

LOCK_FILE = ".lock"


class RunLock:
    """A held lock on a run directory; `release()` gives it up (the process's exit does too)."""

    def __init__(self, run_dir: Path, fd: int, created: bool) -> None:
        self.run_dir = run_dir
        self._fd: int | None = fd
        self.created = created  # this process made the directory (an aborted start removes it again)

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Lock run_dir (created when missing); VitError naming the live holder when another process has it."""
        run_dir = Path(run_dir)
        created = not run_dir.exists()
        make_dirs(run_dir, "--out")
        path = run_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _holder(path)
            os.close(fd)
            raise VitError(f"{run_dir} is in use: another process trains in it ({holder}). Wait for it to end or "
                           "stop it, or choose another --out; eval, inspect, plot, predict and export read a run "
                           "while it trains") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
        return cls(run_dir, fd, created)

    def release(self, aborted: bool = False) -> None:
        """Give up the lock. `aborted`: the start failed; a directory this process created and that holds
        nothing else is removed, so a mistake leaves nothing behind."""
        if self._fd is None:
            return
        if aborted and self.created and {p.name for p in self.run_dir.iterdir()} <= {LOCK_FILE}:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text() or "{}")
        return f"pid {info['pid']} on {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError):
        return "its pid is not recorded yet"


def entries(run_dir: Path) -> list[Path]:
    """What a run directory holds besides its lock file."""
    return [p for p in Path(run_dir).iterdir() if p.name != LOCK_FILE]
