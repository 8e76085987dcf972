"""A training run, built once by `start_run`: process group, run directory, data, model, objective (wrapped
for the processes), optimizer, plan, state (restored on resume), batch streams, logger and display.

The loop (engine/trainer.py) asks it for three things at due steps: `evaluate`, `log_train`, `save`.
Under torchrun every process builds the same run; rank 0 alone prints, logs and writes files.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from vitcli.engine import cluster
from vitcli.engine.batches import TrainStream, eval_batches, fewshot_set, knn_set
from vitcli.engine.cluster import DistEnv
from vitcli.engine.dense_tasks import DENSE_TASKS
from vitcli.engine.logger import ProgressDisplay, RunLogger
from vitcli.engine.plan import StepPlan
from vitcli.engine.rundir import create_run_dir, open_run_dir
from vitcli.engine.runtime import autocast_dtype, configure_device
from vitcli.engine.setup import (RunData, build_data, build_model, build_objective, checkpoint_meta, keeps_head,
                                 precheck)
from vitcli.engine.state import TrainState
from vitcli.engine.step import StepParts, StepResult, build_step
from vitcli.io.checkpoint import LoadedStep, newest_loadable, read_state, read_weights, save_checkpoint, staging_dir
from vitcli.io.paths import write_text
from vitcli.errors import DiskFull
from vitcli.io.rundir import CHECKPOINTS, SHARDED, STATE, SUMMARY_FILE, WEIGHTS, step_dirs
from vitcli.io.runlock import RunLock
from vitcli.io.sharded import consolidate_checkpoint, load_full_optimizer, load_sharded, save_sharded
from vitcli.models.load import LoadedCheckpoint, load_checkpoint
from vitcli.recipe import Recipe
from vitcli.rng import rank_rng_state, restore_rank_rng, seed_everything, seed_rank


@dataclass
class TrainingRun:
    recipe: Recipe
    run_dir: Path
    env: DistEnv
    data: RunData
    plan: StepPlan
    objective: torch.nn.Module
    parts: StepParts
    state: TrainState
    train_batches: TrainStream
    eval_batches: Any
    logger: RunLogger
    progress: ProgressDisplay
    say: Callable[..., Any]
    lock: RunLock | None = None  # rank 0's hold on the run directory

    def release(self) -> None:
        """Give up the run directory (the process's exit does it too)."""
        if self.lock is not None:
            self.lock.release()

    @property
    def model(self) -> torch.nn.Module:
        return self.parts.model

    @property
    def eval_model(self) -> torch.nn.Module:
        """What evaluations score and checkpoints hold: the EMA weights when EMA is on; what the objective
        publishes instead of the trained model if it does (DINO's teacher backbone)."""
        published = self.objective.published()
        if published is not None:
            return published
        return self.parts.ema.module if self.parts.ema is not None else self.parts.model

    @property
    def checkpoints(self) -> Path:
        return self.run_dir / CHECKPOINTS

    @property
    def sharded(self) -> bool:
        """The checkpoint format follows the strategy, whatever the process count."""
        return self.recipe.train.strategy == "fsdp"

    def evaluate(self) -> dict[str, Any]:
        """Score the eval split (all-reduced: every rank agrees), log it and keep it as the latest."""
        step, wall = self.state.step, self.state.wall_seconds()
        metrics = self.objective.evaluate(self.eval_model, self.eval_batches, self.env.device, self.parts.amp_dtype)
        self.logger.log({"kind": "eval", "step": step, "epoch": round(self.plan.epoch(step), 4), "wall_seconds": round(wall, 2),
                         **{k: metrics[k] for k in self.objective.eval_metrics}})
        self.progress.line(f"eval  step {step:>6}  {self.objective.describe(metrics)}  ({wall:.1f}s)")
        self.state.last_eval = metrics
        return metrics

    def log_train(self, result: StepResult, lr: float, images_per_second: float) -> None:
        step = self.state.step
        stats = {"loss": float(result.loss), "lr": lr, "grad_norm": float(result.grad_norm),
                 "images_per_second": round(images_per_second, 1), **{k: float(v) for k, v in result.metrics.items()}}
        if self.train_batches.skipped:
            stats["skipped_images"] = self.train_batches.skipped
        self.logger.log({"kind": "train", "step": step, "epoch": round(self.plan.epoch(step), 4), **stats})
        text = f"loss {stats['loss']:.4f}  lr {lr:.2e}  {images_per_second:,.0f} img/s"
        self.progress.update(step, text)
        if not self.progress.live:
            self.progress.line(f"step {step:>6}/{self.plan.total_steps}  {text}  {self.progress.estimate(step)}")

    def log_skipped(self, result: StepResult) -> None:
        step, bad = self.state.step, self.state.bad_in_a_row
        self.logger.log({"kind": "skipped", "step": step, "loss": float(result.loss), "grad_norm": float(result.grad_norm)})
        self.progress.line(f"step {step}: non-finite loss or gradient, update skipped ({bad} in a row)")

    def save(self, score: float | None) -> None:
        """Checkpoint the current step (`score`: this step's evaluation, None without one).

        Every rank calls this: RNG states are gathered and FSDP shards written collectively."""
        env, state, parts, root = self.env, self.state, self.parts, self.checkpoints
        is_best = state.is_new_best(score)
        rngs = cluster.all_gather(env, rank_rng_state(env.device, env.active))
        stream = self.train_batches.state_dict()  # a shard stream's position, per rank (None: map-style data)
        streams = cluster.all_gather(env, stream) if stream is not None else None
        saved = {**state.state_dict(), "epoch": self.plan.epoch(state.step), "rng": rngs[0], "rng_per_rank": rngs,
                 "data_per_rank": streams,
                 "scaler": parts.scaler.state_dict() if parts.scaler.is_enabled() else None, "world_size": env.world_size}
        threshold = (state.last_eval or {}).get("threshold")  # a multi-label head's, chosen on held-out images
        meta = checkpoint_meta(self.eval_model, self.recipe, self.data, state.step, score, self.objective, threshold)
        weights, staged = None, None
        if self.sharded:  # every rank writes its shards of model (+ objective) + optimizer; state.pt says where
            staged = staging_dir(root, state.step)
            cluster.on_main(env, lambda: shutil.rmtree(staged, ignore_errors=True))
            save_sharded(staged / SHARDED, self.objective.optimized(), parts.optimizer, distributed=env.active)
            saved.update(sharded=True, meta=meta)
        elif env.is_main:  # replicas are identical: rank 0's copy is the run's
            saved.update(optimizer=parts.optimizer.state_dict(),
                         model=parts.model.state_dict() if self.eval_model is not parts.model else None)
            own = self.objective.own_state()  # decoder, [mask] token, head: resumed, never fine-tuned
            if own:
                saved["objective"] = own
            weights = self.eval_model.state_dict()
        if env.is_main:
            written = save_checkpoint(root, state.step, weights, meta, saved, is_best=is_best, keep=self.recipe.train.keep,
                                      staged=staged)
            self.logger.log({"kind": "checkpoint", "step": state.step, "path": str(written.path)})
        cluster.barrier(env)

    def disk_full(self, e: DiskFull) -> DiskFull:
        """`e` (a write on a full disk stopped the run) with what the next checkpoint needs, the space
        free, and the last complete checkpoint; the CLI adds the command that resumes."""
        newest = max(step_dirs(self.checkpoints), key=lambda c: c.step, default=None)
        need = _folder_bytes(newest.path) if newest is not None else self._checkpoint_bytes()
        free = shutil.disk_usage(_existing(self.run_dir)).free
        kept = (f"The last complete checkpoint ({newest.path.name}) is intact." if newest is not None
                else "No checkpoint was written yet.")
        return DiskFull(f"{e} Training stopped at step {self.state.step}: a checkpoint of this run needs about "
                        f"{_megabytes(need)} and {_megabytes(free)} are free there. {kept}", e.path, run_dir=self.run_dir)

    def _checkpoint_bytes(self) -> int:
        """What the first checkpoint will take: weights, optimizer state (and the raw weights under EMA)."""
        tensors = [*self.eval_model.state_dict().values(),
                   *(v for s in self.parts.optimizer.state.values() for v in s.values() if torch.is_tensor(v))]
        if self.eval_model is not self.parts.model:
            tensors += list(self.parts.model.state_dict().values())
        return sum(t.numel() * t.element_size() for t in tensors)

    def close(self) -> None:
        """The end of training, however it ends: display, logs, and the run directory's lock."""
        self.progress.stop()
        self.logger.close()
        self.train_batches.close()  # its workers, now: left to the garbage collector, shutting them down can take 5 s each
        if hasattr(self.eval_batches, "close"):
            self.eval_batches.close()
        self.release()

    def finish(self) -> dict[str, Any]:
        """Write summary.json (rank 0) and return it; a sharded best checkpoint is consolidated first."""
        last, best = self.state.last_eval, self.checkpoints / "best"
        if self.sharded and self.env.is_main and best.is_dir() and not (best / WEIGHTS).exists():
            consolidate_checkpoint(best.resolve())  # so `vit eval` / `vit finetune` read the best weights
        top1 = self.objective.best_metric == "top1"  # classification; else the objective's own best metric
        summary = {
            "best_top1": self.state.best if top1 else None,  # None: no evaluation yet
            "final_top1": last["top1"] if last and top1 else None,
            "final_top5": last["top5"] if last and top1 else None,
            "steps": self.state.step,
            "epochs": self.plan.epoch(self.state.step),
            "wall_seconds": round(self.state.wall_seconds(), 2),
            "checkpoint": str((best / WEIGHTS).resolve()),
            "run_dir": str(self.run_dir),
            "skipped_images": self.train_batches.skipped,
        }
        if not top1:  # multilabel (mAP), mpp / mae (few-shot accuracy, else loss): the best evaluation and the last one
            summary.update(objective=self.objective.name, best_metric=self.objective.best_metric,
                           best_score=self.state.best,
                           final={k: last[k] for k in self.objective.eval_metrics} if last else None)
        if self.env.is_main:
            write_text(self.run_dir / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n", "the run's")
        cluster.barrier(self.env)
        return summary


def start_run(recipe: Recipe, run_dir: Path, *, resume: bool = False, force: bool = False, console: Console | None = None,
              init: LoadedCheckpoint | None = None) -> TrainingRun:
    """Build (or, resuming, rebuild at its last checkpoint) the run in run_dir. `init`: the recipe's
    model.init_ckpt already read by the caller (read here otherwise)."""
    console = console or Console()
    env = cluster.init(recipe.train.device)
    held: list[RunLock] = []
    # rank 0 locks the run directory before it looks at it: a second process is refused untouched
    cluster.on_main(env, lambda: held.append(RunLock.acquire(run_dir)))
    try:
        run = _start(recipe, run_dir, env, console, resume=resume, force=force, init=init)
    except BaseException:
        for lock in held:
            lock.release(aborted=True)
        raise
    run.lock = held[0] if held else None
    return run


def _start(recipe: Recipe, run_dir: Path, env: DistEnv, console: Console, *, resume: bool, force: bool,
           init: LoadedCheckpoint | None) -> TrainingRun:
    state = TrainState()
    say = env.say(console.print)
    # rank 0 prepares the run directory; every rank then uses its answer
    recipe, resuming, run_dir = cluster.on_main(env, lambda: _open(run_dir, recipe, resume, force, say))
    t = recipe.train
    configure_device(env.device)
    seed_everything(t.seed)

    with cluster.main_first(env):  # downloads and cache preparation happen once
        if init is None and recipe.model.init_ckpt:
            init = load_checkpoint(recipe.model.init_ckpt)
        data = build_data(recipe, init, say)
    keep_head = not resuming and keeps_head(recipe.model, init, recipe.data.dataset, data.class_names)
    model = build_model(recipe.model, data.num_classes, init, keep_head=keep_head, task=recipe.task, recipe=recipe, crop=data.img_size)
    if keep_head:
        say(f"Keeping the checkpoint's trained head: its {data.num_classes} classes are {data.name}'s own "
            "(--new-head starts a zero-initialised one).")
    if t.linear_probe:  # the paper's linear evaluation: a frozen backbone under a trained head
        heads = DENSE_TASKS[recipe.task].head_prefixes if recipe.task in DENSE_TASKS else ("head.", "head_dist.")  # distilled: two
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith(heads))
    model.to(env.device)
    plan = StepPlan.make(t, len(data.train), env.world_size)
    fewshot = fewshot_set(data, recipe, env.device, plan.eval_batch)
    knn = knn_set(data, recipe, env.device, plan.eval_batch)
    objective = build_objective(model, data, recipe, fewshot, knn, plan).to(env.device)
    if not resuming:
        cluster.on_main(env, lambda: create_run_dir(run_dir, recipe))
    ema = _make_ema(model, t.ema_decay)
    seed_rank(env.rank, t.seed)  # every rank built the same weights; now each gets its own dropout RNG

    found = _pick_checkpoint(env, run_dir / CHECKPOINTS, say) if resuming else None
    if resuming and found is None:
        say(f"No loadable checkpoint in {run_dir / CHECKPOINTS}; starting {run_dir} from step 0.")
    if found is not None:  # full weights go in before the model is wrapped (sharded ones after)
        _load_weights(model, ema, objective, found)
    amp_dtype = autocast_dtype(t.precision, env.device)
    parts = build_step(objective, recipe.optim, env.device, amp_dtype=amp_dtype, accum=plan.accum, env=env,
                       strategy=t.strategy, activation_checkpointing=t.activation_checkpointing, compile=t.compile, ema=ema)
    if found is not None:
        _restore_training(parts, objective.optimized(), state, found, env, recipe, say)
        say(f"Resuming {run_dir} from {found.path.name} (step {state.step}/{plan.total_steps}).")
    model.train()

    per_step = f"{plan.accum} x {plan.micro_batch}" if env.world_size == 1 else f"{env.world_size} processes x {plan.accum} x {plan.micro_batch}"
    say(
        f"Training {recipe.model.name} on {data.name} ({len(data.train)} train / {len(data.eval)} eval images, "
        f"{data.num_classes} classes) on {env.describe()} {'fp32' if amp_dtype is None else str(amp_dtype).removeprefix('torch.')}"
        f"{f', {t.strategy}' if env.active else ''}: {plan.total_steps} steps ({_epochs(plan.epoch(plan.total_steps))}) "
        f"of {t.batch_size} images ({per_step}), {plan.steps_per_epoch} steps/epoch, peak lr {recipe.optim.lr:g}."
    )
    if objective.start_note():
        say(objective.start_note())
    train_batches = TrainStream(data, recipe, plan, start_step=state.step, device=env.device, rank=env.rank,
                                world_size=env.world_size, saved=_stream_state(found, env))
    if recipe.data.cache != "none":  # a stream has no note: shards are read as they stream, never cached
        say(getattr(train_batches.loader, "cache_note", None) or "data.cache: a streamed set is read as it streams, not cached.")
    if train_batches.restarted_epoch is not None:
        say(f"The checkpoint's shard stream position was saved with another number of readers (processes x loader "
            f"workers); epoch {train_batches.restarted_epoch} restarts from its first shards.")
    logger = RunLogger(run_dir, resume_step=state.step, tensorboard=t.tensorboard, wandb_project=t.wandb,
                       config=recipe.to_dict(), enabled=env.is_main)
    if logger.dropped_partial:
        say(f"Dropped {logger.dropped_partial} half-written line(s) from {logger.path} (cut short by a kill or a full disk).")
    return TrainingRun(
        recipe, run_dir, env, data, plan, objective, parts, state,
        train_batches=train_batches,
        eval_batches=eval_batches(data, recipe, env.device, plan.eval_batch, rank=env.rank, world_size=env.world_size,
                                  lockstep=env.active and t.strategy == "fsdp"),
        logger=logger,
        progress=ProgressDisplay(plan.total_steps, state.step, console, enabled=env.is_main),
        say=say,
    )


def _open(run_dir: Path, recipe: Recipe, resume: bool, force: bool, say) -> tuple[Recipe, bool, Path]:
    """(recipe to use, whether to resume, run_dir): open_run_dir's decision; a new run's recipe is
    prechecked before anything is created."""
    recipe, resuming = open_run_dir(run_dir, recipe, resume=resume, force=force, say=say)
    if not resuming:
        precheck(recipe)
    return recipe, resuming, run_dir


def _pick_checkpoint(env: DistEnv, root: Path, say) -> LoadedStep | None:
    """The newest loadable checkpoint, as rank 0 chose it (the other ranks read the same one)."""
    mine: list[LoadedStep] = []

    def pick() -> str | None:
        found = newest_loadable(root, warn=say)
        mine.extend([found] if found else [])
        return str(found.path) if found else None

    path = cluster.on_main(env, pick)
    if path is None:
        return None
    if mine:
        return mine[0]
    state = read_state(Path(path) / STATE)
    weights = {} if state.get("sharded") else read_weights(Path(path) / WEIGHTS)[0]
    return LoadedStep(Path(path), state["step"], weights, state.get("meta", {}), state)


def _load_weights(model: torch.nn.Module, ema, objective: torch.nn.Module, found: LoadedStep) -> None:
    """The checkpoint's full weights (raw ones from state.pt under EMA; the EMA's from model.safetensors),
    and the objective's own (decoder, [mask] token, head)."""
    if found.state.get("sharded"):
        return  # read after wrapping, with the optimizer (_restore_training)
    model.load_state_dict(found.state["model"] if found.state.get("model") is not None else found.weights)
    if ema is not None:
        ema.module.load_state_dict(found.weights)
    if found.state.get("objective") is not None:
        objective.load_own_state(found.state["objective"])


def _restore_training(parts: StepParts, optimized: torch.nn.Module, state: TrainState, found: LoadedStep, env: DistEnv,
                      recipe: Recipe, say) -> None:
    """Optimizer (and sharded weights), scaler, counters and RNG streams of the checkpoint. `optimized`:
    the module the optimizer updates (the model; for mpp / mae the objective with it)."""
    saved = found.state
    if saved.get("sharded"):
        load_sharded(found.path / SHARDED, optimized, parts.optimizer, distributed=env.active)
    elif env.active and recipe.train.strategy == "fsdp":
        load_full_optimizer(optimized, parts.optimizer, saved["optimizer"])
    else:
        parts.optimizer.load_state_dict(saved["optimizer"])
    if saved.get("scaler"):
        parts.scaler.load_state_dict(saved["scaler"])
    state.load_state_dict(saved)
    restore_rank_rng(saved, env.rank, env.world_size, env.device, env.active, recipe.train.seed, say=say)


def _stream_state(found: LoadedStep | None, env: DistEnv) -> dict | None:
    """This rank's saved shard stream position (None: none saved, or saved by another number of processes)."""
    streams = found.state.get("data_per_rank") if found is not None else None
    return streams[env.rank] if streams and len(streams) == env.world_size else None


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _existing(path: Path) -> Path:
    return next((p for p in (path, *path.parents) if p.exists()), Path("."))


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _epochs(n: float) -> str:
    return f"{n:.4g} epoch{'' if n == 1 else 's'}"


def _make_ema(model: torch.nn.Module, decay: float | None):
    if decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)
