"""Turn a recipe into what a run trains: its data sets, the model, the objective, checkpoint metadata."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitcli import data as vdata
from vitcli.data.balance import IMBALANCE_SHOWN, imbalance_ratio
from vitcli.data.registry import unknown_dataset_error
from vitcli.data.shard_index import is_shard_source
from vitcli.data.shard_sets import check_shards
from vitcli.errors import VitError
from vitcli.models import create_model, model_info
from vitcli.io.meta import CheckpointMeta, Preprocessing
from vitcli.models.adapt import meta_for_model, model_from_checkpoint
from vitcli.models.load import LoadedCheckpoint
from vitcli.models.registry import resolve_config
from vitcli.models.timm_classifier import is_timm_classifier, needs_vit
from vitcli.data.views import build_views_transform
from vitcli.engine.dense_tasks import DENSE_TASKS, HEAD_FIELDS
from vitcli.engine.plan import StepPlan
from vitcli.engine.rundata import RunData
from vitcli import objectives
from vitcli.objectives import FewshotSet
from vitcli.objectives.knn import NeighbourSet
from vitcli.recipe import ModelCfg, Recipe




def precheck(recipe: Recipe) -> None:
    """The cheap checks that catch most mistakes before a run directory is created: the model
    resolves with its overrides, the init checkpoint and a local data set path exist, a data set
    name is known. (Everything else is still checked when the run builds its data and model.)"""
    m, d = recipe.model, recipe.data
    objectives.objective_class(recipe.objective.name).check_recipe(recipe)
    if is_timm_classifier(m.name) and m.init_ckpt is None:
        for key, on in (("train.strategy: fsdp", recipe.train.strategy == "fsdp"),
                        ("train.activation_checkpointing", recipe.train.activation_checkpointing)):
            if on:
                raise needs_vit(f"{key} (applied block by block)", m.name)
    if m.init_ckpt is None:
        resolve_config(m.name, **model_overrides(m, m.num_classes or 1))
    elif ":" not in m.init_ckpt and not Path(m.init_ckpt).expanduser().exists():
        raise VitError(f"model.init_ckpt {m.init_ckpt} does not exist. Pass a run directory, a checkpoint file or timm:<name>.")
    if is_shard_source(d.dataset):
        check_shards(d.dataset, d.train_split)
    elif vdata.lookup(d.dataset) is None and not Path(d.dataset).expanduser().exists():
        raise unknown_dataset_error(d.dataset)
    if d.data_dir is not None and not Path(d.data_dir).expanduser().exists():
        raise VitError(f"data.data_dir {d.data_dir} does not exist. Point it at a local copy of {d.dataset} (an image folder or a save_to_disk directory).")


def model_img_size(cfg: ModelCfg, init: LoadedCheckpoint | None = None) -> tuple[int, int]:
    """The training resolution: the recipe's, else the init checkpoint's, else the model's own."""
    if cfg.img_size is not None:
        size = cfg.img_size
    elif init is not None:
        size = init.meta.model_args.get("img_size") or init.meta.img_size
    else:
        size = model_info(cfg.name)["img_size"]
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def build_data(recipe: Recipe, init: LoadedCheckpoint | None = None, say=None) -> RunData:
    if recipe.task in DENSE_TASKS:
        return DENSE_TASKS[recipe.task].data(recipe, model_img_size(recipe.model, init), say)
    d, seed = recipe.data, recipe.train.seed
    source, transform, mixing = vdata.SourceSpec.of(d), vdata.TransformSpec.of(d), vdata.MixSpec.of(d)
    img_size = model_img_size(recipe.model, init)
    labels = reads_labels(recipe)  # mpp / mae read sets without labels too
    train = vdata.build(source, "train", img_size=img_size, seed=seed, labels=labels, say=say)
    streamed = vdata.is_streamed(train)
    if streamed:
        _check_stream(train, recipe)
    if d.holdout is not None:
        train, evals = split_holdout(train, d.holdout)
    else:
        evals = vdata.build(source, "eval", img_size=img_size, seed=seed, labels=labels)
    # shards named by pattern carry no class names: the evaluation split's labels say how many
    class_names = list(train.class_names or (evals.class_names if streamed else []))
    multilabel = labels and _multilabel(train, recipe, say)
    counts = None if not labels or multilabel else vdata.class_counts(train)  # None: a stream that does not say
    if counts is not None and imbalance_ratio(counts) > IMBALANCE_SHOWN and say is not None:
        shown = ", ".join(f"{name} {n}" for name, n in zip(class_names, counts.tolist()))
        say(f"{train.name} [{train.split}] is imbalanced ({imbalance_ratio(counts):.1f}:1): {shown}. "
            f"data.balance: {d.balance}.")
    # a self-supervised encoder has no head; its checkpoints hold the ViT alone
    num_classes = recipe.model.num_classes or len(class_names) if labels else 0
    return RunData(
        name=train.name,
        train=train,
        eval=evals,
        num_classes=num_classes,
        class_names=class_names,
        img_size=img_size,
        train_transform=_train_transform(recipe, transform, img_size),
        eval_transform=vdata.build_transform(transform, img_size, train=False),
        mixup=vdata.build_mixup(mixing, num_classes),
        criterion=vdata.build_train_loss(mixing, counts, multilabel=multilabel),
        multilabel=multilabel,
    )


def _train_transform(recipe: Recipe, transform: vdata.TransformSpec, img_size: tuple[int, int]):
    """The recipe's crop, or the several views per image its objective asks for (DINO's multi-crop)."""
    views = objectives.objective_class(recipe.objective.name).views(recipe, img_size)
    if views is None:
        return vdata.build_transform(transform, img_size, train=True)
    return build_views_transform(transform, views)


def _multilabel(train, recipe: Recipe, say) -> bool:
    """Whether the training data has several classes per image (data.task auto: as the data says), stated once."""
    found = bool(getattr(train, "multilabel", False))
    task, d = recipe.data.task, recipe.data
    if task == "multilabel" and not found:
        raise VitError(f"data.task multilabel, but {train.name} has one class per image. Give a folder's labels file "
                       "(data.labels: FILE.csv|json) or a set whose label column is a Sequence(ClassLabel).")
    if task == "single" and found:
        raise VitError(f"data.task single, but {train.name} has several classes per image; set data.task: multilabel (or auto).")
    if not found:
        return False
    for key, bad in (("data.balance", d.balance != "none"), ("objective.fewshot", recipe.objective.fewshot)):
        # data.imbalance and data.holdout are refused where they are applied (long_tail, split_holdout)
        if bad:
            raise VitError(f"{key} counts one class per image; {train.name} has several. Drop it for multi-label data.")
    if say is not None:
        source = f", labels from {d.labels}" if d.labels else ""
        say(f"{train.name} is multi-label ({train.num_classes} classes{source}): a sigmoid per class, binary "
            "cross-entropy, judged by mAP.")
    return True


def reads_labels(recipe: Recipe) -> bool:
    """Whether the recipe's objective trains on labels (then its model has a head and top-1 picks the best)."""
    return objectives.objective_class(recipe.objective.name).reads_labels


def fewshot_shots(recipe: Recipe) -> list[int]:
    """The K of the few-shot evaluations at every evaluation: the recipe's, else the objective's default."""
    shots = recipe.objective.fewshot
    return list(shots if shots is not None else objectives.objective_class(recipe.objective.name).default_fewshot)


def _check_stream(train, recipe: Recipe) -> None:
    if recipe.data.balance == "loss_weights" and train.class_counts is None:
        raise VitError(f"data.balance: loss_weights needs the training split's class counts, which the streamed set "
                       f"{train.name} does not give (shards named by pattern, written before vitcli recorded counts, or "
                       "a streamed Hub set). Write the shards with `vit shards` (its index records them), use "
                       "data.balance: sampler (class-balanced draws from the shuffle buffer), or train from a folder or saved set.")
    if recipe.data.repeated_augment > 1:
        raise VitError("data.repeated_augment repeats images of a map-style training set; a streamed set (tar shards, "
                       "data.streaming) reads each sample once per pass. Set it to 1, or train from a folder or saved set.")
    if recipe.data.holdout is not None:
        raise VitError("data.holdout carves a map-style training set; tar shards stream. Drop it and evaluate on the "
                       "shards' evaluation split (data.eval_split).")
    if not train.num_samples and recipe.train.steps is None:
        raise VitError(f"The streamed set {train.name} comes without a sample count, so an epoch has no length. "
                       "Set data.num_samples=N (the training samples in them) or train.steps=N.")


def split_holdout(train: vdata.ImageSet, fraction: float) -> tuple[vdata.ImageSet, vdata.ImageSet]:
    """(rest, held-out) parts of a training split; seed 0 and stratified, so every run holds out the same images."""
    if train.multilabel:
        raise VitError(f"data.holdout counts one class per image; {train.name} has several. Drop it for multi-label data.")
    labels = vdata.label_array(train.dataset)
    from sklearn.model_selection import train_test_split  # here: scikit-learn and scipy cost ~1 s to import

    rest, held = train_test_split(np.arange(len(labels)), test_size=fraction, random_state=0, stratify=_stratify(labels, fraction))
    def part(idx, tag):
        return dataclasses.replace(train, dataset=train.dataset.select(np.sort(idx), keep_in_memory=True), split=f"{train.split}[{tag}]")
    return part(rest, "rest"), part(held, f"holdout {fraction:g}")


def _stratify(labels: np.ndarray, fraction: float) -> np.ndarray | None:
    counts = np.bincount(labels)
    counts = counts[counts > 0]
    return labels if counts.min() >= 2 and fraction * len(labels) >= len(counts) else None


def model_overrides(cfg: ModelCfg, num_classes: int) -> dict[str, Any]:
    """The recipe's model fields as create_model overrides; unset (None) fields keep the model's own."""
    fields = dataclasses.asdict(cfg)
    for key in ("name", "init_ckpt", "new_head", *HEAD_FIELDS):
        fields.pop(key)
    fields["num_classes"] = num_classes
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items() if v is not None}


def keeps_head(cfg: ModelCfg, init: LoadedCheckpoint | None, dataset: str, class_names: list[str] | None) -> bool:
    """Whether fine-tuning keeps the checkpoint's trained head: its classes are the ones trained on now (same
    data set, same class names), as DeiT and timm fine-tune at a higher resolution, unless model.new_head."""
    if init is None or cfg.new_head or not class_names:
        return False
    return init.meta.dataset == dataset and init.meta.class_names == list(class_names)


def build_model(cfg: ModelCfg, num_classes: int, init: LoadedCheckpoint | None = None,
                keep_head: bool = False, task: str = "classification", recipe: Recipe | None = None,
                crop: tuple[int, int] | None = None) -> torch.nn.Module:
    """A fresh model, or (fine-tuning) the init checkpoint's model resampled to the recipe's
    resolution/patch size with its head replaced by a zero-initialised one (paper §3.2), unless
    `keep_head` (the same classes: see keeps_head). A dense task (segmentation, detection: `recipe` and the
    training `crop` given): that model's encoder under the task's head (a decoder, a detector), a checkpoint
    of the same task keeping its own when keep_head."""
    headed = init is not None and init.meta.task in DENSE_TASKS
    if headed and task != init.meta.task:
        raise VitError(f"{init.source} is a {init.meta.task} model (a ViT with a task head); fine-tune it with task: "
                       f"{init.meta.task}, or from its encoder alone.")
    if init is None:
        model = create_model(cfg.name, **model_overrides(cfg, 0 if task in DENSE_TASKS else num_classes))
    else:
        args = {k: getattr(cfg, k) for k in ("drop_rate", "attn_drop_rate", "drop_path_rate")}
        if cfg.global_pool is not None:  # asked for (e.g. "avg" for MAE's fine-tuning); unset keeps the checkpoint's
            args["global_pool"] = cfg.global_pool
        model, _ = model_from_checkpoint(init, img_size=cfg.img_size and tuple(model_img_size(cfg)), patch_size=cfg.patch_size,
                                         model_args=args)
    if task in DENSE_TASKS:
        if headed and keep_head and model.num_classes == num_classes:
            return model
        recipe = recipe or Recipe(task=task, model=cfg)
        return DENSE_TASKS[task].new_model(model, recipe, num_classes, crop or model_img_size(cfg, init))
    if init is not None and not (keep_head and model.num_classes == num_classes):
        model.reset_classifier(num_classes)
    return model


def objective_name(recipe: Recipe, data: RunData) -> str:
    """The objective trained: the recipe's, with supervised on multi-label data meaning multilabel and on
    a dense task's data (task: segmentation, detection) meaning that task's objective."""
    name = recipe.objective.name
    if recipe.task in DENSE_TASKS:
        if name not in ("supervised", recipe.task):
            raise VitError(f"objective {name} does not train task: {recipe.task}; drop objective.name ({recipe.task} is implied).")
        return recipe.task
    if name in DENSE_TASKS:
        raise VitError(f"objective {name} needs task: {name} (a task head and its targets): set task: {name}.")
    if data.multilabel and name == "supervised":
        return "multilabel"
    if data.multilabel and name != "multilabel":
        raise VitError(f"objective {name} does not train on multi-label data yet; use objective supervised (multi-label).")
    if name == "multilabel" and not data.multilabel:
        raise VitError(f"objective multilabel needs multi-label data; {data.name} has one class per image.")
    return name


def build_objective(model: torch.nn.Module, data: RunData, recipe: Recipe, fewshot: FewshotSet | None = None,
                    knn: NeighbourSet | None = None, plan: StepPlan | None = None) -> objectives.Objective:
    """The recipe's training objective around the model (objectives.OBJECTIVES by name)."""
    d = recipe.data
    given = objectives.Inputs(criterion=data.criterion, num_classes=data.num_classes, class_names=data.class_names or None,
                              mean=tuple(d.mean), std=tuple(d.std), fewshot=fewshot, knn=knn, window=min(data.img_size),
                              window_stride=d.window_stride,
                              eval_scales=tuple(d.eval_scales), eval_flip=d.eval_flip,
                              steps_per_epoch=plan.steps_per_epoch if plan else 1, total_steps=plan.total_steps if plan else 1)
    return objectives.build_objective(dataclasses.replace(recipe.objective, name=objective_name(recipe, data)), model, given)


def checkpoint_meta(model: torch.nn.Module, recipe: Recipe, data: RunData, step: int, score: float | None,
                    objective: objectives.Objective, threshold: float | None = None) -> dict[str, Any]:
    """What a checkpoint needs to rebuild and feed its model without the run directory, as written to
    disk. `score`: this step's evaluation by the objective's `best_metric` (top-1 for classification, mAP
    for multi-label; for mpp / mae few-shot accuracy or minus the loss); `threshold`: a multi-label head's."""
    d = recipe.data
    base = CheckpointMeta(
        model="", model_args={}, class_names=data.class_names, dataset=d.dataset, data_dir=d.data_dir,
        objective=objective.name, task="multilabel" if data.multilabel else None,
        preprocess=Preprocessing(mean=tuple(d.mean), std=tuple(d.std), interpolation=d.interpolation, crop_pct=d.crop_pct))
    metric = objective.best_metric
    if metric == "top1":
        training = {"step": step, "top1": score}
    else:
        training = {"step": step, "top1": None, "score": score, **({metric: score} if objective.reads_labels else {})}
    if threshold is not None:
        training["threshold"] = threshold
    return meta_for_model(model, base, **training).to_dict()
