"""The training loop, top to bottom. Everything it uses is built once by `start_run` (engine/run.py);
one optimizer step is `train_step` (engine/step.py, the step `vit bench` times too).

Under torchrun the same loop runs in every process: each rank takes its slice of every global batch,
DDP or FSDP2 averages the gradients, evaluation sums are all-reduced, and rank 0 alone prints, logs
and writes files.
"""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console

from vitcli.engine.optim import lr_at, weight_decay_at
from vitcli.engine.run import start_run
from vitcli.engine.signals import StopRequested, graceful_stop
from vitcli.engine.step import train_step
from vitcli.errors import DiskFull, VitError
from vitcli.models.load import LoadedCheckpoint
from vitcli.recipe import Recipe


def itstime(step: int, every: int | None, total: int, *, last: bool = True) -> bool:
    """Whether a periodic event is due after `step`: every `every` steps (never when None), and at the
    last step when `last` (big_vision's u.itstime)."""
    return bool(every) and step % every == 0 or (last and step == total)


def train(recipe: Recipe, run_dir: Path, *, resume: bool = False, force: bool = False, console: Console | None = None,
          init: LoadedCheckpoint | None = None) -> dict:
    """Run (or continue) one training run in run_dir and return its summary (summary.json)."""
    run = start_run(recipe, run_dir, resume=resume, force=force, console=console, init=init)
    state, plan, t = run.state, run.plan, run.recipe.train
    tick, images_since = time.perf_counter(), 0  # images/s between log lines
    try:
        with graceful_stop() as signals:  # SIGTERM / first Ctrl-C: checkpoint at the end of this step, then stop
            while state.step < plan.total_steps:
                lr = lr_at(state.step, plan.total_steps, run.recipe.optim.lr, run.recipe.schedule)
                wd = weight_decay_at(state.step, plan.total_steps, run.recipe.optim)
                result = train_step(run.parts, run.train_batches, lr, state.step + 1, stop_requested=lambda: signals.requested,
                                    weight_decay=wd)
                state.step += 1
                images_since += t.batch_size

                if result.applied:
                    state.bad_in_a_row = 0
                else:  # a non-finite loss or gradient: the update was skipped
                    state.bad_in_a_row += 1
                    run.log_skipped(result)
                    if state.bad_in_a_row >= t.max_bad_steps:
                        raise VitError(
                            f"{state.bad_in_a_row} steps in a row had a non-finite loss or gradient (train.max_bad_steps). "
                            f"Lower optim.lr, raise schedule.warmup_steps or use precision fp32; the last good checkpoint is kept in {run.checkpoints}."
                        )

                if itstime(state.step, t.log_every, plan.total_steps):
                    now = time.perf_counter()
                    run.log_train(result, lr, images_since / max(now - tick, 1e-9))
                    tick, images_since = now, 0
                else:
                    run.progress.update(state.step)

                evaluated = itstime(state.step, plan.eval_every, plan.total_steps)
                # No periodic checkpoint inside a run of non-finite steps: the last good one stays newest.
                checkpoint_due = itstime(state.step, t.checkpoint_every, plan.total_steps, last=False) and state.bad_in_a_row == 0
                score = run.objective.score(run.evaluate()) if evaluated else None
                if evaluated or checkpoint_due or result.stop:
                    run.save(score)
                if result.stop:
                    raise StopRequested(state.step, str(run.run_dir))
        return run.finish()
    except DiskFull as e:  # a checkpoint, a metrics line or summary.json: stop with what it needs, resumable
        raise run.disk_full(e) from e
    finally:
        run.close()
