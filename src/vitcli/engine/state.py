"""TrainState: the counters a run carries from step to step and from checkpoint to resume."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TrainState:
    step: int = 0  # optimizer updates taken (skipped non-finite ones included)
    best: float | None = None  # the best evaluation score so far (higher is better; see the objective's score)
    bad_in_a_row: int = 0  # consecutive steps with a non-finite loss or gradient
    wall_before: float = 0.0  # seconds this run spent in earlier processes (before a resume)
    last_eval: dict[str, Any] | None = None  # this process's latest evaluation
    started: float = field(default_factory=time.perf_counter)

    def wall_seconds(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def is_new_best(self, score: float | None) -> bool:
        """Whether score beats every earlier one; if so it becomes the best."""
        if score is None or (self.best is not None and score <= self.best):
            return False
        self.best = score
        return True

    def state_dict(self) -> dict[str, Any]:
        """The keys of state.pt this state owns (names kept from the first checkpoint format)."""
        # the latest evaluation's numbers: a run resumed after its last step (summary.json lost) reports them
        last = {k: float(v) for k, v in (self.last_eval or {}).items() if isinstance(v, (int, float))}
        return {"step": self.step, "best_top1": self.best, "bad_in_a_row": self.bad_in_a_row,
                "wall_seconds": self.wall_seconds(), "last_eval": last or None}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.step, self.best = saved["step"], saved["best_top1"]
        self.bad_in_a_row, self.wall_before = saved.get("bad_in_a_row", 0), saved.get("wall_seconds", 0.0)
        self.last_eval = saved.get("last_eval")
