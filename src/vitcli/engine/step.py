"""One optimizer step, the same for `vit pretrain`, `vit finetune` and `vit bench`:

    autocast forward -> objective loss -> backward (accumulated over micro-batches; DDP syncs on the
    last) -> one all-reduce of the loss and the stop flag -> unscale -> the objective's before_update ->
    global-norm clip of every trainable parameter -> optimizer step (skipped, gradients dropped, when the
    loss or gradient norm is not finite) -> the objective's after_update (DINO's teacher) -> EMA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from vitcli.engine.cluster import DistEnv, agree, local_value
from vitcli.engine.optim import build_optimizer, set_lr
from vitcli.engine.parallel import accumulating, grad_scaler, wrap
from vitcli.recipe import OptimCfg


@dataclass
class StepParts:
    """What a step needs, built once. `module` is what the loop calls: the objective, possibly DDP-wrapped
    and compiled; `model` is the bare model (its EMA follows it)."""

    module: torch.nn.Module
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    params: list[torch.nn.Parameter]  # the trainable ones: clipped together
    device: torch.device
    clip: float | None = None  # global gradient-norm bound; None: no clipping (the norm is still reported)
    accum: int = 1
    amp_dtype: torch.dtype | None = None
    ddp: Any = None
    ema: Any = None  # timm ModelEmaV3
    env: DistEnv | None = None
    objective: Any = None  # the bare objective: its per-step hooks (DINO's schedules, last-layer freeze, teacher)


def build_step(objective: torch.nn.Module, optim: OptimCfg, device: torch.device, *, amp_dtype: torch.dtype | None = None,
               accum: int = 1, env: DistEnv | None = None, strategy: str = "ddp", activation_checkpointing: bool = False,
               compile: bool = False, ema: Any = None) -> StepParts:
    """Wrap the objective for the processes (once), then build the optimizer over the final parameters,
    the gradient scaler (fp16 only) and, when asked, the compiled module."""
    model = objective.model
    module, ddp = objective, None
    if env is not None:
        module, ddp = wrap(objective, strategy, env, activation_checkpointing=activation_checkpointing)
    optimizer = build_optimizer(objective.optimized(), optim, device)  # the model, plus the objective's own parts
    sharded = env is not None and env.active and strategy == "fsdp"
    scaler = grad_scaler(device, amp_dtype == torch.float16, sharded=sharded)
    params = [p for p in objective.optimized().parameters() if p.requires_grad]  # clipped together: all it updates
    return StepParts(torch.compile(module) if compile else module, model, optimizer, scaler, params, device,
                     optim.clip_grad_norm, accum, amp_dtype, ddp, ema, env, objective)


@dataclass
class StepResult:
    loss: torch.Tensor  # mean over micro-batches and processes
    grad_norm: torch.Tensor  # before clipping
    applied: bool  # False: non-finite loss or gradient, the update was skipped
    stop: bool  # some process was asked to stop (SIGTERM / Ctrl-C): every process stops after this step
    metrics: dict[str, torch.Tensor]  # the objective's, averaged over micro-batches


def train_step(parts: StepParts, batches: Iterator, lr: float, number: int, *,
               stop_requested: Callable[[], bool] = lambda: False, weight_decay: float | None = None) -> StepResult:
    """Take one optimizer step at learning rate `lr` (`number`: this update's 1-based count, for EMA; a
    `weight_decay` replaces the decayed groups' own: DINO's schedule).

    `stop_requested` is asked once the gradients are in (a signal may arrive during the step); under
    torchrun every process learns whether any process was asked."""
    set_lr(parts.optimizer, lr, weight_decay)
    hooks = parts.objective
    if hooks is not None:
        hooks.begin_step(number)
    loss_sum = torch.zeros((), device=parts.device)
    metric_sums: dict[str, torch.Tensor] = {}
    for i in range(parts.accum):
        batch = next(batches)
        with accumulating(parts.ddp, last=i == parts.accum - 1):  # DDP syncs on the last only
            with torch.autocast(parts.device.type, dtype=parts.amp_dtype) if parts.amp_dtype else nullcontext():
                loss, metrics = parts.module(batch)
                loss = loss / parts.accum
            parts.scaler.scale(loss).backward()
        loss_sum += loss.detach()
        for key, value in metrics.items():
            metric_sums[key] = metric_sums.get(key, 0) + value.detach() / parts.accum
    stop = stop_requested()
    if parts.env is not None:
        loss_sum, stop = agree(parts.env, loss_sum, stop)  # mean over ranks; stop together
    parts.scaler.unscale_(parts.optimizer)
    if hooks is not None:
        hooks.before_update()
    grad_norm = local_value(torch.nn.utils.clip_grad_norm_(parts.params, parts.clip or float("inf")))
    applied = bool(torch.isfinite(loss_sum) and torch.isfinite(grad_norm))
    if applied:
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
        parts.optimizer.zero_grad(set_to_none=True)
        if hooks is not None:
            hooks.after_update()
        if parts.ema is not None:
            parts.ema.update(parts.model, step=number)
    else:  # drop this step's gradients; the scaler (fp16) lowers its scale
        parts.optimizer.zero_grad(set_to_none=True)
        parts.scaler.update()
    return StepResult(loss_sum, grad_norm, applied, stop, metric_sums)
