"""Timing harness: warm up, then time steps in interleaved rounds, synchronising the device.

Several contestants (our model, timm's, the matmul probe) are timed in the same process in rounds
A B, B A, A B, ... so that a machine whose load drifts (other jobs on a shared CPU, GPU clocks) slows
them alike. Each step is timed on its own: with CUDA events on a GPU (no host sync inside a round, so
kernels queue as in training), with `time.perf_counter` on a CPU (which runs ops synchronously).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch


def synchronize(device: torch.device) -> None:
    """Wait for all queued work on device (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Contestant:
    """Something to time: `step()` runs one unit of work; `before_round`/`after_round` bracket each round
    (the memory tracking on CUDA hooks in there)."""

    name: str
    step: Callable[[], object]
    before_round: Callable[[], None] = lambda: None
    after_round: Callable[[], None] = lambda: None
    per_round: int | None = None  # fixed steps per round (the matmul probe); None: the models' share
    times: list[float] = field(default_factory=list)  # seconds per timed step


@dataclass(frozen=True)
class Stats:
    """Per-step time statistics in seconds."""

    n: int
    median: float
    mean: float
    min: float
    max: float
    iqr: float  # interquartile range (p75 - p25): the spread

    @classmethod
    def of(cls, times: Sequence[float]) -> Stats:
        if not times:
            raise ValueError("no timed steps")
        ordered = sorted(times)
        if len(ordered) >= 2:
            q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
        else:
            q1 = q3 = ordered[0]
        return cls(len(ordered), statistics.median(ordered), statistics.fmean(ordered), ordered[0], ordered[-1], q3 - q1)


def time_steps(step: Callable[[], object], n: int, device: torch.device) -> list[float]:
    """Run step n times; the seconds each took (device work included)."""
    if n <= 0:
        return []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        synchronize(device)
        for start, end in zip(starts, ends):
            start.record()
            step()
            end.record()
        synchronize(device)
        return [s.elapsed_time(e) / 1000.0 for s, e in zip(starts, ends)]
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def run_rounds(contestants: Sequence[Contestant], *, steps: int, rounds: int, device: torch.device,
               on_round: Callable[[int, int], None] | None = None) -> None:
    """Time `steps` steps of every contestant, split over `rounds` interleaved rounds (A B, B A, ...).

    Warm-up is the caller's business (it differs per contestant: compilation, FLOP counting).
    Results are appended to each contestant's `times`.
    """
    rounds = max(1, min(rounds, steps))
    per_round = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    for r, n in enumerate(per_round):
        order = contestants if r % 2 == 0 else list(reversed(contestants))
        for c in order:
            c.before_round()
            c.times.extend(time_steps(c.step, c.per_round or n, device))
            c.after_round()
        if on_round is not None:
            on_round(r + 1, rounds)
