"""Fine-tuning (paper §3.2): a pretrained checkpoint, a new zero head, a higher resolution.

A fine-tuning run is a training run whose recipe names `model.init_ckpt`; this module only builds
that recipe and runs the optional learning-rate sweep. The recipe is, in order: --recipe; the shipped
recipes/finetune_*.yaml for the data set (digits -> finetune_digits.yaml); else the paper's settings
(Table 4: SGD, batch 512, 2,500 steps for sets it does not name) fitted to the set's size
(`fitted_schedule`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from vitcli import data as vdata
from vitcli.data import lookup
from vitcli.data.det_sources import load_box_split
from vitcli.data.seg_sources import load_mask_split
from vitcli.data.shard_index import is_shard_source
from vitcli.engine.trainer import train
from vitcli.errors import VitError
from vitcli.io.meta import CheckpointMeta
from vitcli.models.load import LoadedCheckpoint, load_checkpoint
from vitcli.recipe import DataCfg, Recipe, load_recipe, parse_yaml, recipe_from_dict
from vitcli.recipe_files import RecipeFile, shipped_dir

# Paper Table 4: fine-tuning steps at batch 512 per data set (VTAB-style sets: 2500).
PAPER_STEPS = {"imagenet-1k": 20_000, "cifar10": 10_000, "cifar100": 10_000, "oxford-iiit-pet": 500, "oxford-flowers102": 500}
OTHER_STEPS = 2_500
PAPER_BATCH = 512
# Fitting the paper's schedule to a set of N training images (sets without a shipped recipe only):
MAX_EPOCHS = 50  # at most 50 epochs (the paper's named sets run 8-125; its VTAB count is 1,280 on 1,000 images)
MIN_BATCHES_PER_EPOCH = 10  # batch halved from 512 until N holds 10 batches ...
MIN_BATCH = 16  # ... but not below 16
MICRO_BATCH = 64  # images per forward pass; accumulated to the batch
# The paper's learning-rate grid; held-out fractions it used for choosing from it (Appendix B.1.1).
PAPER_LR_GRID = (0.001, 0.003, 0.01, 0.03)
MAE_LAYER_DECAY, MAE_LAYER_DECAY_DEEP = 0.65, 0.75  # MAE's FINETUNE.md: ViT-B 0.65, ViT-L/H 0.75


@dataclass
class FinetunePlan:
    """Where a fine-tuning recipe came from, to say so at the start."""

    recipe: Recipe
    init: LoadedCheckpoint
    source: str  # one line: the recipe file, or the rule that fitted the paper's defaults


def fitted_schedule(num_train: int, dataset: str) -> dict:
    """The paper's batch and step count for `dataset`, fitted to `num_train` images: the batch is
    halved from 512 until the set holds MIN_BATCHES_PER_EPOCH batches (not below MIN_BATCH), and the
    steps are capped at MAX_EPOCHS epochs. Sets of 5,120+ images keep batch 512; large ones the
    paper's steps."""
    spec = lookup(dataset)
    steps = PAPER_STEPS.get(spec.name if spec else "", OTHER_STEPS)
    batch = PAPER_BATCH
    while batch > MIN_BATCH and batch * MIN_BATCHES_PER_EPOCH > num_train:
        batch //= 2
    batch = max(1, min(batch, num_train))
    steps = max(1, min(steps, MAX_EPOCHS * (num_train // batch)))  # an epoch is num_train // batch steps (drop_last)
    return {
        "schedule": {"warmup_steps": min(500, steps // 10), "decay": "cosine"},
        "train": {"steps": steps, "batch_size": batch, "micro_batch_size": min(MICRO_BATCH, batch),
                  "eval_every": max(1, steps // 10)},
    }


def paper_finetune_recipe(num_train: int, dataset: str) -> dict:
    """SGD momentum 0.9, no weight decay, cosine decay after a short warmup, clip 1; batch and steps
    as `fitted_schedule` says."""
    fitted = fitted_schedule(num_train, dataset)
    return {
        "optim": {"name": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 0.0, "clip_grad_norm": 1.0},
        **fitted,
        "data": {"crop_scale": [0.08, 1.0], "hflip": 0.5},
    }


def segmenter_finetune_recipe(num_train: int, dataset: str) -> dict:
    """Segmenter's fine-tuning settings (Strudel et al., 2021, §4.2: SGD, lr 0.001, momentum 0.9, no weight
    decay, poly decay, drop path 0.1), with the batch and steps fitted to the set as `fitted_schedule` does."""
    fitted = fitted_schedule(num_train, dataset)
    fitted["schedule"]["decay"] = "poly"
    return {"task": "segmentation", "optim": {"name": "sgd", "lr": 0.001, "momentum": 0.9, "weight_decay": 0.0,
                                              "clip_grad_norm": None},
            "model": {"drop_path_rate": 0.1}, **fitted}


def vitdet_finetune_recipe(num_train: int, dataset: str) -> dict:
    """ViTDet's fine-tuning settings (Li et al., 2022, §4 and detectron2's projects/ViTDet configs: AdamW lr 1e-4,
    betas 0.9 / 0.999, weight decay 0.1, layer decay 0.7, drop path 0.1, large-scale jitter 0.1-2.0, flips,
    250 warmup steps, the rate x0.1 at 88.9% and 96.3% of the run), batch and steps fitted to the set as
    `fitted_schedule` does. Global attention unless the recipe sets model.window_size."""
    fitted = fitted_schedule(num_train, dataset)
    fitted["schedule"].update(warmup_steps=min(250, fitted["schedule"]["warmup_steps"]), decay="step",
                              step_milestones=[0.889, 0.963], step_factor=0.1)
    return {"task": "detection", "optim": {"name": "adamw", "lr": 1e-4, "betas": [0.9, 0.999], "weight_decay": 0.1,
                                           "layer_decay": 0.7, "clip_grad_norm": None},
            "model": {"drop_path_rate": 0.1}, "data": {"resize_range": [0.1, 2.0], "hflip": 0.5}, **fitted}


RECIPE_PREFIX = {"classification": "finetune_", "segmentation": "segment_", "detection": "detect_"}  # shipped recipes by task


def shipped_recipe(dataset: str, task: str = "classification") -> Path | None:
    """recipes/finetune_*.yaml (task segmentation: segment_*.yaml, detection: detect_*.yaml) whose data.dataset is
    this set (digits -> finetune_digits.yaml, digits-seg -> segment_digits.yaml), if any."""
    spec = lookup(dataset)
    if spec is None:
        return None
    for path in sorted(shipped_dir().glob(f"{RECIPE_PREFIX[task]}*.yaml")):
        named = (parse_yaml(path.read_text(), str(path)).get("data") or {}).get("dataset")
        if isinstance(named, str) and lookup(named) == spec:
            return path
    return None


def build_finetune_recipe(
    ckpt: str,
    *,
    res: tuple[int, int] | None,
    dataset: str | None,
    recipe_file: RecipeFile | None,
    overrides: list[str],
    task: str | None = None,
    decoder: str | None = None,
    detector: str | None = None,
) -> FinetunePlan:
    """The recipe of a fine-tuning run, checkpoint, data set and resolution filled in: `recipe_file`,
    else the shipped recipe for the data set, else the paper's settings (task segmentation: Segmenter's)
    fitted to its size. The data set: --dataset, else the recipe file's, else the checkpoint's."""
    init = load_checkpoint(ckpt)
    meta = init.meta
    stated = parse_yaml(recipe_file.path.read_text(), str(recipe_file.path)) if recipe_file is not None else {}
    task = task or stated.get("task") or (meta.task if meta.task in RECIPE_PREFIX else "classification")
    dataset = dataset or (stated.get("data") or {}).get("dataset") or meta.dataset
    if not dataset:
        raise VitError(f"{ckpt} does not say which data set it was trained on. Pass --dataset NAME or PATH.")
    fixed = [f"data.dataset={dataset}", f"model.init_ckpt={init.source}", f"model.name={meta.model}", f"task={task}"]
    if decoder is not None:
        fixed.append(f"model.decoder={decoder}")
    if detector is not None:
        fixed.append(f"model.detector={detector}")
    if res is not None:
        fixed.append(f"model.img_size=[{res[0]}, {res[1]}]")
    if dataset == meta.dataset and meta.data_dir:
        fixed.append(f"data.data_dir={meta.data_dir}")
    if meta.preprocess is not None:  # feed the model the normalisation it was trained with
        fixed += [f"data.mean={list(meta.preprocess.mean)}", f"data.std={list(meta.preprocess.std)}"]
    if recipe_file is None and (found := shipped_recipe(dataset, task)) is not None:
        recipe_file = RecipeFile(found, f"the shipped recipe '{found.stem}' for {dataset}")
    recipe_path = recipe_file.path if recipe_file is not None else None
    fixed += _mae_defaults(meta, recipe_path, overrides, task)
    if recipe_file is not None:
        return FinetunePlan(load_recipe(recipe_file.path, fixed + overrides), init, _with_mae_note(recipe_file.origin, meta))
    name = f"{RECIPE_PREFIX[task]}{Path(str(dataset)).name}"
    data_only = recipe_from_dict({"name": name, "train": {"steps": 1}}, fixed + [o for o in overrides if o.startswith("data.")])
    d = data_only.data
    if task == "segmentation":
        num_train = _dense_train_count(d, load_mask_split)
        defaults = segmenter_finetune_recipe(num_train, dataset)
    elif task == "detection":
        num_train = _dense_train_count(d, load_box_split)
        defaults = vitdet_finetune_recipe(num_train, dataset)
    else:
        num_train = len(vdata.build(vdata.SourceSpec.of(data_only.data), "train"))
        defaults = paper_finetune_recipe(num_train, dataset)
    if any(o.startswith("train.batch_size=") for o in overrides) and not any(o.startswith("train.micro_batch_size=") for o in overrides):
        defaults["train"]["micro_batch_size"] = None  # the user's batch, in one pass unless they say otherwise
    recipe = recipe_from_dict({"name": name, **defaults}, fixed + overrides)
    fit = defaults["train"]
    settings = {"segmentation": "Segmenter's settings (SGD momentum 0.9, poly decay, drop path 0.1)",
                "detection": "ViTDet's settings (AdamW lr 1e-4, layer decay 0.7, drop path 0.1, large-scale jitter)"}.get(
        task, "the paper's settings (SGD momentum 0.9, cosine decay, clip 1)")
    source = (f"{settings} fitted to {num_train:,} training images: "
              f"batch {fit['batch_size']}, {fit['steps']:,} steps (the batch halved from {PAPER_BATCH} until the set holds "
              f"{MIN_BATCHES_PER_EPOCH} batches, at most {MAX_EPOCHS} epochs)")
    if any(o.startswith(("train.", "schedule.")) for o in overrides):
        source += "; your --set values on top"
    return FinetunePlan(recipe, init, _with_mae_note(source, meta))


def mae_layer_decay(depth: int) -> float:
    """MAE's fine-tuning layer decay: 0.65 for ViT-B and smaller, 0.75 for ViT-L/H (24+ blocks)."""
    return MAE_LAYER_DECAY_DEEP if depth >= 24 else MAE_LAYER_DECAY


def _dense_train_count(d: DataCfg, load_split) -> int:
    """Training images of a segmentation or detection set, which the fitted settings scale with: tar shards'
    from their index (the training split streams; it is not read to count it)."""
    if is_shard_source(d.dataset):
        return len(vdata.stream_split(d.dataset, d.train_split, d.num_samples))
    return len(load_split(d.dataset, d.train_split, data_dir=d.data_dir, subset=d.train_subset))


def _mae_defaults(meta: CheckpointMeta, recipe_path: Path | None, overrides: list[str], task: str = "classification") -> list[str]:
    """MAE's fine-tuning settings where they differ from the paper's, for an MAE checkpoint: layer-wise lr
    decay and average pooling of the patch tokens, unless the recipe file or --set says otherwise."""
    if meta.objective != "mae":
        return []
    stated = parse_yaml(recipe_path.read_text(), str(recipe_path)) if recipe_path is not None else {}
    given = {o.split("=", 1)[0] for o in overrides}
    out = []
    # ViTDet fine-tunes MAE encoders with its own layer decay (0.7 for ViT-B), which its defaults carry
    if task != "detection" and "optim.layer_decay" not in given and "layer_decay" not in (stated.get("optim") or {}):
        out.append(f"optim.layer_decay={mae_layer_decay(int(meta.model_args.get('depth') or 12))}")
    if "model.global_pool" not in given and "global_pool" not in (stated.get("model") or {}):
        out.append("model.global_pool=avg")
    return out


def _with_mae_note(source: str, meta: CheckpointMeta) -> str:
    if meta.objective != "mae":
        return source
    return source + "; MAE's fine-tuning defaults on top (layer-wise lr decay, average pooling)"


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
