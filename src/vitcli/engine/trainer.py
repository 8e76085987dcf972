"""The training loop, top to bottom: data, model, optimizer, then steps with periodic evaluation.

One optimizer step: autocast forward -> loss -> backward (accumulated over micro-batches) ->
global-norm clip -> optimizer -> EMA. Every `eval_every` steps: evaluate, log, checkpoint.

Under torchrun the same loop runs in every process (see engine/distributed.py): each rank takes its
slice of every global batch, DDP or FSDP2 averages the gradients, evaluation sums are all-reduced,
and rank 0 alone prints, logs and writes files.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console

from vitcli.engine import checkpoint as ckpt
from vitcli.engine import distributed as dist
from vitcli.engine.evaluate import evaluate
from vitcli.engine.logger import ProgressDisplay, RunLogger
from vitcli.engine.optim import build_optimizer, lr_at, set_lr
from vitcli.engine.rundir import CHECKPOINTS, create_run_dir, open_run_dir
from vitcli.engine.runtime import autocast_dtype, configure_device, seed_everything
from vitcli.engine.setup import RunData, build_data, build_model, checkpoint_meta, eval_batches, train_batches
from vitcli.engine.signals import StopRequested, graceful_stop
from vitcli.errors import VitError
from vitcli.models.load import LoadedCheckpoint, load_checkpoint
from vitcli.recipe import Recipe


@dataclass
class StepPlan:
    """How the recipe's global batch maps onto micro-batches, steps and epochs."""

    micro_batch: int
    accum: int
    steps_per_epoch: int
    total_steps: int
    eval_every: int

    @classmethod
    def make(cls, recipe: Recipe, num_train: int, world_size: int = 1) -> StepPlan:
        t = recipe.train
        micro = t.micro_batch_size or max(1, t.batch_size // world_size)
        if t.batch_size % (micro * world_size):
            raise VitError(f"train.batch_size ({t.batch_size}) must be a multiple of micro_batch_size x processes ({micro} x {world_size}).")
        accum = t.batch_size // (micro * world_size)
        steps_per_epoch = num_train // t.batch_size
        if steps_per_epoch == 0:
            raise VitError(f"train.batch_size ({t.batch_size}) is larger than the training set ({num_train} images). Lower it with --set train.batch_size=N.")
        total = t.steps if t.steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))
        return cls(micro, accum, steps_per_epoch, total, t.eval_every or steps_per_epoch)


def train(
    recipe: Recipe,
    run_dir: Path,
    *,
    resume: bool = False,
    force: bool = False,
    console: Console | None = None,
    init: LoadedCheckpoint | None = None,
) -> dict:
    """Run (or continue) one training run in run_dir and return its summary.

    Under torchrun every process calls this; rank 0 alone prints, logs and writes files.
    """
    console = console or Console()
    started = time.perf_counter()
    env = dist.init(recipe.train.device)
    say = console.print if env.is_main else _quiet
    # rank 0 prepares the run directory; every rank then uses its answer (and its path)
    recipe, resuming, run_dir = dist.on_main(env, lambda: (*open_run_dir(run_dir, recipe, resume=resume, force=force, say=say), run_dir))
    t = recipe.train
    device = env.device
    amp_dtype = autocast_dtype(t.precision, device)
    configure_device(device)
    sharded = t.strategy == "fsdp"  # the checkpoint format follows the strategy, whatever the process count
    seed_everything(t.seed)

    # ---- data and model ------------------------------------------------------------------------
    with dist.main_first(env):  # downloads and cache preparation happen once
        if init is None and recipe.model.init_ckpt:  # `init`: the same checkpoint, already read by the caller
            init = load_checkpoint(recipe.model.init_ckpt)
        data: RunData = build_data(recipe, init)
    model = build_model(recipe.model, data.num_classes, init)
    if t.linear_probe:  # the paper's linear evaluation: a frozen backbone under a trained head
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("head."))
    model.to(device)
    plan = StepPlan.make(recipe, len(data.train), env.world_size)
    if not resuming:
        dist.on_main(env, lambda: create_run_dir(run_dir, recipe))
    ema = _make_ema(model, t.ema_decay)
    dist.seed_rank(env, t.seed)  # every rank built the same weights; now each gets its own dropout RNG
    step, best_top1, bad_in_a_row, wall_before = 0, -1.0, 0, 0.0

    # ---- resume (1/2): rank 0 picks the checkpoint; full weights go in before the model is wrapped --
    root = run_dir / CHECKPOINTS
    found = _find_checkpoint(env, root, say) if resuming else None
    if resuming and found is None:
        say(f"No loadable checkpoint in {root}; starting {run_dir} from step 0.")
        resuming = False
    if found is not None and not found[2].get("sharded"):
        _, weights, state = found
        model.load_state_dict(state["model"] if state.get("model") is not None else weights)
        if ema is not None:
            ema.module.load_state_dict(weights)

    # ---- distribute: DDP replicas or FSDP shards; the optimizer sees the final parameters -------
    train_model, ddp = dist.wrap(model, t.strategy, env, activation_checkpointing=t.activation_checkpointing)
    fsdp = env.active and sharded
    optimizer = build_optimizer(model, recipe.optim, device)
    scaler = dist.grad_scaler(device, amp_dtype == torch.float16, sharded=fsdp)

    # ---- resume (2/2): optimizer (and sharded weights), counters, RNG ----------------------------
    if found is not None:
        step_dir, _, state = found
        if state.get("sharded"):
            dist.load_sharded(env, step_dir / dist.SHARDED, model, optimizer)
        elif fsdp:
            dist.load_full_optimizer(model, optimizer, state["optimizer"])
        else:
            optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state.get("scaler", {})) if state.get("scaler") else None
        step, best_top1 = state["step"], state["best_top1"]
        bad_in_a_row, wall_before = state.get("bad_in_a_row", 0), state.get("wall_seconds", 0.0)
        dist.restore_rng(state, env, t.seed, say=say)
        say(f"Resuming {run_dir} from {step_dir.name} (step {step}/{plan.total_steps}).")
    logger = RunLogger(run_dir, resume_step=step if resuming else 0, tensorboard=t.tensorboard, wandb_project=t.wandb,
                       config=recipe.to_dict(), enabled=env.is_main)

    model.train()
    train_model = torch.compile(train_model) if t.compile else train_model
    trainable = [p for p in model.parameters() if p.requires_grad]
    criterion = data.criterion.to(device)
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    per_step = f"{plan.accum} x {plan.micro_batch}" if env.world_size == 1 else f"{env.world_size} processes x {plan.accum} x {plan.micro_batch}"
    say(
        f"Training {recipe.model.name} on {data.name} ({len(data.train)} train / {len(data.eval)} eval images, "
        f"{data.num_classes} classes) on {env.describe()} {'fp32' if amp_dtype is None else str(amp_dtype).removeprefix('torch.')}"
        f"{f', {t.strategy}' if env.active else ''}: {plan.total_steps} steps of {t.batch_size} images ({per_step}), "
        f"{plan.steps_per_epoch} steps/epoch, peak lr {recipe.optim.lr:g}."
    )
    progress = ProgressDisplay(plan.total_steps, step, console, enabled=env.is_main)

    def save(step_done: int, eval_top1: float | None) -> None:
        """Every rank calls this: RNG states are gathered and FSDP shards written collectively."""
        nonlocal best_top1
        is_best = eval_top1 is not None and eval_top1 > best_top1
        if is_best:
            best_top1 = eval_top1
        eval_model = ema.module if ema is not None else model
        rngs = dist.gather_rng(env)
        state = {
            "step": step_done,
            "epoch": step_done / plan.steps_per_epoch,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "rng": rngs[0],
            "rng_per_rank": rngs,
            "world_size": env.world_size,
            "best_top1": best_top1,
            "bad_in_a_row": bad_in_a_row,
            "wall_seconds": wall_before + time.perf_counter() - started,
        }
        meta = checkpoint_meta(eval_model, recipe, data, step_done, eval_top1)
        weights, staged = None, None
        if sharded:  # every rank writes its shards of model + optimizer; state.pt says where they are
            staged = ckpt.staging_dir(root, step_done)
            dist.on_main(env, lambda: shutil.rmtree(staged, ignore_errors=True))
            dist.save_sharded(env, staged / dist.SHARDED, model, optimizer)
            state.update(sharded=True, meta=meta)
        elif env.is_main:  # replicas are identical: rank 0's copy is the run's
            state.update(optimizer=optimizer.state_dict(), model=model.state_dict() if ema is not None else None)
            weights = eval_model.state_dict()
        if env.is_main:
            saved = ckpt.save_checkpoint(root, step_done, weights, meta, state, is_best=is_best, keep=t.keep, staged=staged)
            logger.log({"kind": "checkpoint", "step": step_done, "path": str(saved.path)})
        dist.barrier(env)

    eval_loader = eval_batches(data, recipe, device, rank=env.rank, world_size=env.world_size, lockstep=fsdp)

    def run_eval(step_done: int) -> dict:
        eval_model = ema.module if ema is not None else model
        metrics = evaluate(eval_model, eval_loader, data.num_classes, device, amp_dtype)  # all-reduced: every rank agrees
        wall = wall_before + time.perf_counter() - started
        logger.log({"kind": "eval", "step": step_done, "epoch": round(step_done / plan.steps_per_epoch, 4), "wall_seconds": round(wall, 2),
                    **{k: metrics[k] for k in ("top1", "top5", "loss", "ece", "num_images", "images_per_second")}})
        progress.line(f"eval  step {step_done:>6}  top1 {metrics['top1']:.4f}  top5 {metrics['top5']:.4f}  loss {metrics['loss']:.4f}  ({wall:.1f}s)")
        return metrics

    # ---- the loop -----------------------------------------------------------------------------
    last_eval: dict | None = None
    batches = train_batches(data, recipe, plan, start_step=step, device=device, rank=env.rank, world_size=env.world_size)
    tick, images_since = time.perf_counter(), 0
    try:
        with graceful_stop() as stop:
            while step < plan.total_steps:
                lr = lr_at(step, plan.total_steps, recipe.optim.lr, recipe.schedule)
                set_lr(optimizer, lr)

                loss_sum = torch.zeros((), device=device)
                for i in range(plan.accum):
                    images, targets = next(batches)
                    with dist.accumulating(ddp, last=i == plan.accum - 1):  # DDP syncs on the last only
                        with amp:
                            loss = criterion(train_model(images), targets) / plan.accum
                        scaler.scale(loss).backward()
                    loss_sum += loss.detach()
                loss_sum, stop_now = dist.agree(env, loss_sum, stop.requested)  # mean over ranks; stop together
                scaler.unscale_(optimizer)
                clip = recipe.optim.clip_grad_norm or float("inf")
                grad_norm = dist.local_value(torch.nn.utils.clip_grad_norm_(trainable, clip))
                step += 1
                images_since += t.batch_size

                if not (torch.isfinite(loss_sum) and torch.isfinite(grad_norm)):
                    optimizer.zero_grad(set_to_none=True)
                    scaler.update()
                    bad_in_a_row += 1
                    logger.log({"kind": "skipped", "step": step, "loss": float(loss_sum), "grad_norm": float(grad_norm)})
                    progress.line(f"step {step}: non-finite loss or gradient, update skipped ({bad_in_a_row} in a row)")
                    if bad_in_a_row >= t.max_bad_steps:
                        raise VitError(
                            f"{bad_in_a_row} steps in a row had a non-finite loss or gradient (train.max_bad_steps). "
                            f"Lower optim.lr, raise schedule.warmup_steps or use precision fp32; the last good checkpoint is kept in {root}."
                        )
                else:
                    bad_in_a_row = 0
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None:
                        ema.update(model, step=step)

                if step % t.log_every == 0 or step == plan.total_steps:
                    now = time.perf_counter()
                    ips = images_since / max(now - tick, 1e-9)
                    tick, images_since = now, 0
                    stats = {"loss": float(loss_sum), "lr": lr, "grad_norm": float(grad_norm), "images_per_second": round(ips, 1)}
                    if data.skipped_images:
                        stats["skipped_images"] = data.skipped_images
                    logger.log({"kind": "train", "step": step, "epoch": round(step / plan.steps_per_epoch, 4), **stats})
                    progress.update(step, f"loss {stats['loss']:.4f}  lr {lr:.2e}  {ips:,.0f} img/s")
                    if not progress.live:
                        progress.line(f"step {step:>6}/{plan.total_steps}  loss {stats['loss']:.4f}  lr {lr:.2e}  {ips:,.0f} img/s")
                else:
                    progress.update(step, "")

                at_eval = step % plan.eval_every == 0 or step == plan.total_steps
                # No periodic checkpoint inside a run of non-finite steps: the last good one stays newest.
                at_ckpt = t.checkpoint_every is not None and step % t.checkpoint_every == 0 and bad_in_a_row == 0
                if at_eval:
                    last_eval = run_eval(step)
                if at_eval or at_ckpt or stop_now:
                    save(step, last_eval["top1"] if at_eval else None)
                if stop_now:
                    raise StopRequested(step, str(run_dir))
    finally:
        progress.stop()
        logger.close()

    wall = wall_before + time.perf_counter() - started
    best = root / "best"
    if sharded and env.is_main and best.is_dir() and not (best / ckpt.WEIGHTS).exists():
        dist.consolidate_checkpoint(best.resolve())  # so `vit eval` / `vit finetune` read the best weights
    summary = {
        "best_top1": best_top1,
        "final_top1": last_eval["top1"] if last_eval else None,
        "final_top5": last_eval["top5"] if last_eval else None,
        "steps": step,
        "epochs": step / plan.steps_per_epoch,
        "wall_seconds": round(wall, 2),
        "checkpoint": str((best / ckpt.WEIGHTS).resolve()),
        "run_dir": str(run_dir),
        "skipped_images": data.skipped_images,
    }
    if env.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    dist.barrier(env)
    return summary


def _quiet(*args, **kwargs) -> None:
    """What ranks other than 0 print: nothing."""


def _find_checkpoint(env: dist.DistEnv, root: Path, say) -> tuple[Path, dict, dict] | None:
    """(step directory, weights, training state) of the newest loadable checkpoint, as rank 0 chose it."""
    mine: list = []

    def pick() -> str | None:
        found = ckpt.newest_loadable(root, warn=say)
        mine.extend(found or ())
        return str(found[0].path) if found else None

    path = dist.on_main(env, pick)
    if path is None:
        return None
    if mine:
        return mine[0].path, mine[1], mine[3]
    state = ckpt.read_state(Path(path) / ckpt.STATE)
    weights = {} if state.get("sharded") else ckpt.read_weights(Path(path) / ckpt.WEIGHTS)[0]
    return Path(path), weights, state


def _make_ema(model: torch.nn.Module, decay: float | None):
    if decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)
