"""Fine-tuning (paper §3.2): a pretrained checkpoint, a new zero head, a higher resolution.

A fine-tuning run is a training run whose recipe names `model.init_ckpt`; this module only builds
that recipe (the paper's defaults, or a recipe file) and runs the optional learning-rate sweep.
"""

from __future__ import annotations

import copy
from pathlib import Path

from rich.console import Console

from vitcli.data import lookup
from vitcli.engine.trainer import train
from vitcli.errors import VitError
from vitcli.models.load import LoadedCheckpoint, load_checkpoint
from vitcli.recipe import Recipe, load_recipe, recipe_from_dict

# Paper Table 4: fine-tuning steps at batch 512 per data set (VTAB-style sets: 2500).
PAPER_STEPS = {"imagenet-1k": 20_000, "cifar10": 10_000, "cifar100": 10_000, "oxford-iiit-pet": 500, "oxford-flowers102": 500}
OTHER_STEPS = 2_500
# The paper's learning-rate grid; held-out fractions it used for choosing from it (Appendix B.1.1).
PAPER_LR_GRID = (0.001, 0.003, 0.01, 0.03)


def paper_finetune_recipe(dataset: str) -> dict:
    """SGD momentum 0.9, no weight decay, cosine decay after a short warmup, clip 1, batch 512."""
    spec = lookup(dataset)
    steps = PAPER_STEPS.get(spec.name if spec else "", OTHER_STEPS)
    return {
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "clip_grad_norm": 1.0},
        "schedule": {"warmup_steps": min(500, steps // 10), "decay": "cosine"},
        "train": {"steps": steps, "batch_size": 512, "micro_batch_size": 64, "eval_every": max(1, steps // 10)},
        "data": {"crop_scale": [0.08, 1.0], "hflip": 0.5},
    }


def build_finetune_recipe(
    ckpt: str,
    *,
    res: tuple[int, int] | None,
    dataset: str | None,
    recipe_path: Path | None,
    overrides: list[str],
) -> tuple[Recipe, LoadedCheckpoint]:
    """The recipe of a fine-tuning run: checkpoint, data set and resolution filled in."""
    init = load_checkpoint(ckpt)
    meta = init.meta
    dataset = dataset or meta.get("dataset")
    if not dataset:
        raise VitError(f"{ckpt} does not say which data set it was trained on. Pass --dataset NAME or PATH.")
    fixed = [f"data.dataset={dataset}", f"model.init_ckpt={init.source}", f"model.name={meta['model']}"]
    if res is not None:
        fixed.append(f"model.img_size=[{res[0]}, {res[1]}]")
    if dataset == meta.get("dataset") and meta.get("data_dir"):
        fixed.append(f"data.data_dir={meta['data_dir']}")
    for key in ("mean", "std"):  # feed the model the normalisation it was trained with
        if meta.get(key) is not None:
            fixed.append(f"data.{key}={list(meta[key])}")
    if recipe_path is not None:
        recipe = load_recipe(recipe_path, fixed + overrides)
    else:
        name = f"finetune_{Path(str(dataset)).name}"
        recipe = recipe_from_dict({"name": name, **paper_finetune_recipe(dataset)}, fixed + overrides)
    return recipe, init


def finetune(recipe: Recipe, run_dir: Path, *, lr_sweep: list[float] | None, resume: bool, force: bool, console: Console,
             init: LoadedCheckpoint | None = None) -> dict:
    """Train from the recipe's init checkpoint (`init`: that checkpoint already read, so it is read
    once for all runs); with lr_sweep, first pick the rate on a held-out split."""
    if lr_sweep:
        recipe = copy.deepcopy(recipe)
        recipe.optim.lr = sweep_learning_rate(recipe, run_dir / "lr-sweep", lr_sweep, resume=resume, force=force, console=console, init=init)
    return train(recipe, run_dir / "final" if lr_sweep else run_dir, resume=resume, force=force, console=console, init=init)


def sweep_learning_rate(recipe: Recipe, root: Path, rates: list[float], *, resume: bool, force: bool, console: Console,
                        init: LoadedCheckpoint | None = None) -> float:
    """The paper's protocol: fine-tune once per rate on (train minus a held-out part), keep the best
    by held-out top-1. 10% is held out (the paper: 10% for small sets, 2% CIFAR, 1% ImageNet)."""
    if any(r <= 0 for r in rates):
        raise VitError(f"--lr-sweep rates must be positive; got {rates}.")
    holdout = recipe.data.holdout or 0.1
    results = {}
    for lr in rates:
        trial = copy.deepcopy(recipe)
        trial.optim.lr = lr
        trial.data.holdout = holdout
        trial.schedule.min_lr = min(trial.schedule.min_lr, lr)
        trial.name = f"{recipe.name}-lr{lr:g}"
        console.print(f"[bold]lr sweep:[/] lr={lr:g} on {1 - holdout:.0%} of the training split, scored on the held-out {holdout:.0%}")
        summary = train(trial, root / f"lr-{lr:g}", resume=resume, force=force, console=console, init=init)
        results[lr] = summary["final_top1"]
    best = max(results, key=lambda lr: results[lr])
    table = ", ".join(f"{lr:g}: {top1:.4f}" for lr, top1 in results.items())
    console.print(f"[bold]lr sweep:[/] held-out top-1 by rate: {table}; fine-tuning with lr={best:g}")
    return best
