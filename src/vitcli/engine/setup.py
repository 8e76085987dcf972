"""Turn a recipe into the things the loop uses: data sets, loaders, loss and the model."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.model_selection import train_test_split as sklearn_split

from vitcli import data as vdata
from vitcli.models import create_model, model_info
from vitcli.models.load import LoadedCheckpoint, meta_for_model, model_from_checkpoint
from vitcli.recipe import ModelCfg, Recipe


@dataclass
class RunData:
    name: str
    train: Any  # vitcli.data.ImageSet
    eval: Any
    num_classes: int
    class_names: list[str]
    img_size: tuple[int, int]
    train_transform: Any
    eval_transform: Any
    mixup: Any  # timm.data.Mixup or None
    criterion: torch.nn.Module
    skipped_images: int = 0  # unreadable training images dropped so far (data.bad_images: skip)


def model_img_size(cfg: ModelCfg, init: LoadedCheckpoint | None = None) -> tuple[int, int]:
    """The training resolution: the recipe's, else the init checkpoint's, else the model's own."""
    if cfg.img_size is not None:
        size = cfg.img_size
    elif init is not None:
        size = init.meta["model_args"].get("img_size") or init.meta["img_size"]
    else:
        size = model_info(cfg.name)["img_size"]
    if isinstance(size, int):
        return (size, size)
    return (int(size[0]), int(size[1]))


def build_data(recipe: Recipe, init: LoadedCheckpoint | None = None) -> RunData:
    d, seed = recipe.data, recipe.train.seed
    img_size = model_img_size(recipe.model, init)
    train = vdata.build(d, "train", img_size=img_size, seed=seed)
    if d.holdout is not None:
        train, evals = split_holdout(train, d.holdout)
    else:
        evals = vdata.build(d, "eval", img_size=img_size, seed=seed)
    num_classes = recipe.model.num_classes or train.num_classes
    mixup = vdata.build_mixup(d, num_classes)
    return RunData(
        name=train.name,
        train=train,
        eval=evals,
        num_classes=num_classes,
        class_names=list(train.class_names),
        img_size=img_size,
        train_transform=vdata.build_transform(d, img_size, train=True),
        eval_transform=vdata.build_transform(d, img_size, train=False),
        mixup=mixup,
        criterion=vdata.build_train_loss(d),
    )


def split_holdout(train: vdata.ImageSet, fraction: float) -> tuple[vdata.ImageSet, vdata.ImageSet]:
    """(rest, held-out) parts of a training split; seed 0 and stratified, so every run holds out the same images."""
    labels = np.asarray(train.dataset["label"])
    rest, held = sklearn_split(np.arange(len(labels)), test_size=fraction, random_state=0, stratify=_stratify(labels, fraction))
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
    for key in ("name", "init_ckpt"):
        fields.pop(key)
    fields["num_classes"] = num_classes
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in fields.items() if v is not None}


def build_model(cfg: ModelCfg, num_classes: int, init: LoadedCheckpoint | None = None) -> torch.nn.Module:
    """A fresh model, or (fine-tuning) the init checkpoint's model resampled to the recipe's
    resolution/patch size with its head replaced by a zero-initialised one (paper §3.2)."""
    if init is None:
        return create_model(cfg.name, **model_overrides(cfg, num_classes))
    regularisers = {k: getattr(cfg, k) for k in ("drop_rate", "attn_drop_rate", "drop_path_rate")}
    model, _ = model_from_checkpoint(init, img_size=cfg.img_size and tuple(model_img_size(cfg)), patch_size=cfg.patch_size, model_args=regularisers)
    model.reset_classifier(num_classes)
    return model


def checkpoint_meta(model: torch.nn.Module, recipe: Recipe, data: RunData, step: int, top1: float | None) -> dict[str, Any]:
    """What a checkpoint needs to rebuild and feed its model without the run directory."""
    return meta_for_model(model, {
        "mean": recipe.data.mean,
        "std": recipe.data.std,
        "interpolation": recipe.data.interpolation,
        "crop_pct": recipe.data.crop_pct,
        "dataset": recipe.data.dataset,
        "data_dir": recipe.data.data_dir,
        "class_names": data.class_names,
        "step": step,
        "top1": top1,
    })


def train_batches(data: RunData, recipe: Recipe, plan, *, start_step: int, device: torch.device,
                  rank: int = 0, world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless micro-batches on the device, epoch after epoch, from `start_step` on; Mixup/CutMix applied.

    Each epoch yields exactly steps_per_epoch x accum micro-batches, so steps never straddle epochs.
    With several processes the loader's batch is one micro-step of all ranks (micro_batch x
    world_size images, in the same global order as with one process) and this rank takes its slice.
    """
    epoch, pos = divmod(start_step, plan.steps_per_epoch)
    per_epoch = plan.steps_per_epoch * plan.accum
    loader = vdata.make_loader(
        data.train,
        data.train_transform,
        plan.micro_batch * world_size,
        shuffle=True,
        drop_last=True,
        num_workers=recipe.data.num_workers,
        seed=recipe.train.seed,
        epoch=epoch,
        start_batch=pos * plan.accum,
        rank=rank,
        world_size=world_size,
        bad_images=recipe.data.bad_images,
        pin_memory=device.type == "cuda",
        device=device,
    )
    taken = pos * plan.accum
    while True:
        for images, labels in loader:  # delivered on `device`
            if data.mixup is not None:
                images, labels = data.mixup(images, labels)
            data.skipped_images = loader.skipped
            yield images, labels
            taken += 1
            if taken == per_epoch:
                break
        epoch, taken = epoch + 1, 0
        loader.set_epoch(epoch)


EVAL_CACHE_BYTES = 256 * 2**20  # finished eval batches kept between evaluations (where they are delivered)


def eval_batches(data: RunData, recipe: Recipe, device: torch.device, batch_size: int | None = None, *,
                 rank: int = 0, world_size: int = 1, lockstep: bool = False):
    """Evaluation batches of `batch_size` images per process (default: twice the micro-batch), re-iterable.

    Build it once per run: its first full pass is kept in memory when it fits in EVAL_CACHE_BYTES
    (evaluation transforms are deterministic), so later evaluations of a small set skip decoding.

    With several processes each global batch is split across ranks without padding or repeats, so
    the all-reduced sums count every image exactly once. `lockstep` (FSDP, whose forward is a
    collective) makes every rank yield the same number of batches: a rank whose share ran out runs a
    one-image dummy batch with no labels, which evaluate() does not count.
    """
    micro = recipe.train.micro_batch_size or recipe.train.batch_size // world_size
    per_rank = batch_size or min(micro * 2, 1024)
    loader = vdata.make_loader(
        data.eval,
        data.eval_transform,
        per_rank * world_size,
        shuffle=False,
        drop_last=False,
        num_workers=recipe.data.num_workers,
        seed=recipe.train.seed,
        rank=rank,
        world_size=world_size,
        bad_images=recipe.data.bad_images,
        pin_memory=device.type == "cuda",
        device=device,
        cache_bytes=EVAL_CACHE_BYTES,
    )
    if not lockstep:
        return loader
    dummy = (torch.zeros(1, recipe.model.in_chans, *data.img_size), torch.zeros(0, dtype=torch.int64))
    return Lockstep(loader, dummy)


class Lockstep:
    """Re-iterable: the loader's batches, then dummies up to the longest rank's batch count."""

    def __init__(self, loader: vdata.Loader, dummy: tuple[torch.Tensor, torch.Tensor]):
        self.loader, self.dummy = loader, dummy

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = 0
        for batch in self.loader:
            yield batch
            n += 1
        for _ in range(n, self.loader.batches_per_epoch):
            yield self.dummy
