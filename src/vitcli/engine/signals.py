"""Preemption: SIGTERM / Ctrl-C ask the loop to checkpoint and stop; a second Ctrl-C stops at once."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager

# Exit code of a run stopped by a signal after saving its checkpoint (distinct from 0, 1 and 2).
STOPPED_EXIT_CODE = 3


class StopRequested(Exception):
    """Raised by the loop after it saved a checkpoint in answer to a signal."""

    def __init__(self, step: int, run_dir: str = ""):
        super().__init__(f"stopped at step {step}")
        self.step = step
        self.run_dir = run_dir


class _Flag:
    requested = False
    signal_name = ""


@contextmanager
def graceful_stop():
    """Within this block the first SIGINT/SIGTERM sets `flag.requested`; a second SIGINT raises."""
    flag = _Flag()
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signals can only be handled on the main thread
        return

    def handler(signum, frame):
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested = True
        flag.signal_name = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
