"""Where metrics go: metrics.jsonl always, TensorBoard and W&B when asked, and the console."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn

from vitcli.errors import VitError, path_error
from vitcli.io.paths import write_text
from vitcli.io.rundir import METRICS_FILE


class RunLogger:
    """Appends one JSON object per event to metrics.jsonl and mirrors scalars to the trackers."""

    def __init__(self, run_dir: Path, *, resume_step: int | None, tensorboard: bool, wandb_project: str | None, config: dict, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self.tb = None
        self.wandb = None
        self.dropped_partial = 0  # half-written lines found on resume (and dropped)
        if not enabled:
            return
        if resume_step is not None:
            self._truncate_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise VitError("train.tensorboard is on but TensorBoard is not installed: pip install 'vitcli[tensorboard]'.") from e
            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=resume_step)
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise VitError("train.wandb names a project but wandb is not installed: pip install wandb (or set train.wandb: null).") from e
            self.wandb = wandb.init(project=wandb_project, name=run_dir.name, config=config, dir=str(run_dir), resume="allow")

    def _truncate_after(self, step: int) -> None:
        """On resume, drop events logged after the checkpoint, so the file reads as one clean run."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:  # a line cut short by a kill or a full disk
                self.dropped_partial += 1
        write_text(self.path, "".join(k + "\n" for k in kept), "the run's")

    def log(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        event = {"time": round(time.time(), 3), **event}
        try:
            with self.path.open("a") as f:
                f.write(json.dumps(event) + "\n")
        except OSError as e:
            raise path_error(e, self.path, "the run's") from e
        step = event.get("step", 0)
        scalars = {k: v for k, v in event.items() if isinstance(v, (int, float)) and k not in ("step", "time")}
        prefix = event.get("kind", "train")
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{prefix}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def clock(seconds: float) -> str:
    """1:02:03, 2:03 or 0:05."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class ProgressDisplay:
    """A rich progress bar on a terminal; plain periodic lines in CI and log files. After the first step
    both show the time left and the estimated total time of this process's part of the run."""

    def __init__(self, total_steps: int, start_step: int, console: Console, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self.total = total_steps
        self.start_step = start_step
        self.started = time.perf_counter()
        if self.live:
            self.progress = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
                TextColumn("{task.fields[eta]}"),
                console=console,
                transient=False,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, stats="", eta="")
            self.progress.start()

    def estimate(self, step: int) -> str:
        """'eta 0:42, total ~0:47' from the pace of the steps done so far ('' before the first)."""
        done = step - self.start_step
        if done < 1:
            return ""
        elapsed = time.perf_counter() - self.started
        left = elapsed / done * (self.total - step)
        return f"eta {clock(left)}, total ~{clock(elapsed + left)}"

    def update(self, step: int, stats: str | None = None) -> None:
        """Move the bar to `step`; `stats` replaces the bar's text (None keeps the last)."""
        if self.live:
            fields = {"eta": self.estimate(step)} if stats is None else {"stats": stats, "eta": self.estimate(step)}
            self.progress.update(self.task, completed=step, **fields)

    def line(self, text: str) -> None:
        """A line that should appear in both modes (evaluations, checkpoints, periodic stats)."""
        if self.enabled:
            self.console.print(text, highlight=False)

    def stop(self) -> None:
        if self.live:
            self.progress.stop()
