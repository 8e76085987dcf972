"""Where metrics go: metrics.jsonl always, TensorBoard and W&B when asked, and the console."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from vitcli.errors import VitError


class RunLogger:
    """Appends one JSON object per event to metrics.jsonl and mirrors scalars to the trackers."""

    def __init__(self, run_dir: Path, *, resume_step: int | None, tensorboard: bool, wandb_project: str | None, config: dict, enabled: bool = True):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        self.wandb = None
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
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        self.path.write_text("".join(k + "\n" for k in kept))

    def log(self, event: dict[str, Any]) -> None:
        if not self.enabled:
            return
        event = {"time": round(time.time(), 3), **event}
        with self.path.open("a") as f:
            f.write(json.dumps(event) + "\n")
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


class ProgressDisplay:
    """A rich progress bar on a terminal; plain periodic lines in CI and log files."""

    def __init__(self, total_steps: int, start_step: int, console: Console, enabled: bool = True):
        self.console = console
        self.enabled = enabled
        self.live = enabled and console.is_terminal
        self.total = total_steps
        if self.live:
            self.progress = Progress(
                TextColumn("step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeRemainingColumn(),
                console=console,
                transient=False,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, stats="")
            self.progress.start()

    def update(self, step: int, stats: str) -> None:
        if self.live:
            self.progress.update(self.task, completed=step, stats=stats)

    def line(self, text: str) -> None:
        """A line that should appear in both modes (evaluations, checkpoints, periodic stats)."""
        if self.enabled:
            self.console.print(text, highlight=False)

    def stop(self) -> None:
        if self.live:
            self.progress.stop()
