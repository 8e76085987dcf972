"""The small typed settings the data layer takes (not the whole recipe).

    source = SourceSpec.of(recipe.data)          # which images: data set, splits, subsets
    transform = TransformSpec.of(recipe.data)    # crops, flips, RandAugment, normalisation, pipeline
    mixing = MixSpec.of(recipe.data)             # Mixup / CutMix / label smoothing
    TransformSpec.from_checkpoint(meta)          # the eval transform a checkpoint was trained with
    LoaderSpec.evaluation(256, num_workers=2)    # how a loader batches: checked once, here

`of(obj)` copies the same-named fields from any object (a recipe's data section has them all); the
defaults equal the recipe's.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal, Optional, TypeVar

from vitcli.errors import VitError
from vitcli.io.meta import CheckpointMeta, Preprocessing

S = TypeVar("S")


def _frozen(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


class _FromFields:
    @classmethod
    def of(cls: type[S], source: Any) -> S:
        """This spec's fields, read by name from `source` (e.g. a recipe's DataCfg)."""
        return cls(**{f.name: _frozen(getattr(source, f.name)) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class SourceSpec(_FromFields):
    """Which images: a registry name or path, a local copy of a named set, splits and subsets."""

    dataset: str = "digits"
    data_dir: Optional[str] = None
    train_split: Optional[str] = None  # None: the set's own
    eval_split: Optional[str] = None
    train_subset: Optional[int] = None  # a seeded random choice of this many images
    labels: Optional[str] = None  # a multi-label folder's labels file (CSV or JSON: data/multilabel.py)
    imbalance: Optional[float] = None  # training split subsampled to a long tail of this max:min ratio (data/balance.py)
    eval_subset: Optional[int] = None
    num_samples: Optional[int] = None  # training samples of tar shards named by pattern (no index)
    streaming: bool = False  # stream the training split (a Hub set through datasets' streaming=True)


@dataclass(frozen=True)
class TransformSpec(_FromFields):
    """Train augmentation (RandomResizedCrop, flip, RandAugment, random erasing), the eval resize and
    centre crop, the normalisation (one mean/std per channel: 1 for greyscale models) and the pipeline."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4 / 3)
    hflip: float = 0.5
    randaugment: Optional[str] = None
    random_erasing: float = 0.0
    three_augment: bool = False  # DeiT III: one of greyscale, solarize, blur per image
    simple_crop: bool = False  # DeiT III: resize + random crop (4 px reflect padding) instead of RandomResizedCrop
    color_jitter: float = 0.0
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    pipeline: Literal["auto", "pil", "tensor"] = "auto"
    reduced_decode: bool = True  # tensor pipeline: JPEGs at 1/2-1/8 size when the crop keeps the output's pixels

    @property
    def tensor_pipeline(self) -> bool:
        """auto means tensor unless an augmentation only timm's PIL path has is on."""
        if self.pipeline == "auto":
            return not (self.randaugment or self.random_erasing or self.three_augment or self.simple_crop or self.color_jitter)
        return self.pipeline == "tensor"

    @classmethod
    def from_checkpoint(cls, meta: CheckpointMeta, in_chans: int = 3, reduced_decode: bool = True) -> TransformSpec:
        """The eval settings a checkpoint was trained with (defaults: mean = std = 0.5, bicubic, crop_pct 0.875)."""
        pre = meta.preprocess or Preprocessing(mean=(0.5,) * in_chans, std=(0.5,) * in_chans)
        return cls(mean=tuple(pre.mean), std=tuple(pre.std), interpolation=pre.interpolation,
                   crop_pct=pre.crop_pct, reduced_decode=reduced_decode)


@dataclass(frozen=True)
class MixSpec(_FromFields):
    """Mixup / CutMix alphas (0: off) and label smoothing (folded into the soft targets when mixing)."""

    mixup: float = 0.0
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    loss: Literal["ce", "bce"] = "ce"
    balance: Literal["none", "sampler", "loss_weights"] = "none"  # loss_weights: per class, from the class counts
    class_weights: Literal["inverse", "effective"] = "inverse"
    effective_beta: float = 0.999


CacheMode = Literal["none", "decoded", "auto"]
BUDGET_FRACTION = 4  # the default budget: a quarter of the machine's RAM


def default_budget() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // BUDGET_FRACTION


@dataclass(frozen=True)
class CacheSpec(_FromFields):
    """Decode each image once (data/decoded_cache.py): data.cache and data.cache_budget (bytes; None: a
    quarter of the RAM)."""

    cache: CacheMode = "none"
    cache_budget: Optional[int] = None

    def budget_bytes(self) -> int:
        return default_budget() if self.cache_budget is None else self.cache_budget


@dataclass(frozen=True)
class LoaderSpec:
    """How a loader batches a set; the values users give (batch size, workers, bad images) are checked
    here, once, whichever command passed them.

    batch_size: the global batch per step (split across ranks). shuffle / drop_last: True / True for
    training, False / False for evaluation. seed: fixes the order and the augmentation. bad_images:
    "error" (stop, naming the image) or "skip" (drop it, counted). pin_memory None: when CUDA is
    available. decode_on_device (tensor pipeline): workers send JPEG bytes and the main process decodes
    on the device; None: when the device is CUDA. cache_bytes: replay the first pass from memory when its
    batches fit (evaluation loaders only: no shuffling, no augmentation). reuse_buffers: a consumer done
    with each batch before it takes the one after next (a training loop) lets the tensor pipeline
    normalise CPU batches into two buffers used in turn (data/batches.BatchBuffers).
    """

    batch_size: int
    shuffle: bool = False
    drop_last: bool = False
    num_workers: int = 0
    seed: int = 0
    bad_images: Literal["error", "skip"] = "error"
    pin_memory: Optional[bool] = None
    decode_on_device: Optional[bool] = None
    cache_bytes: int = 0
    balanced: bool = False  # training: draw images with probability 1 / their class's count (data/balance.py)
    repeats: int = 1  # repeated augmentation (training): each image this many times per epoch, see EpochBatchSampler
    cache: CacheSpec = CacheSpec()  # decode each image once (data.cache), data/decoded_cache.py
    reuse_buffers: bool = False

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise VitError(f"The batch size must be at least 1, got {self.batch_size} (--batch-size, train.batch_size).")
        if self.num_workers < 0:
            raise VitError(f"The number of loader workers must be 0 or more, got {self.num_workers} (--num-workers, data.num_workers).")
        if self.bad_images not in ("error", "skip"):
            raise VitError(f"bad images must be 'error' or 'skip', got {self.bad_images!r} (--bad-images, data.bad_images).")
        if self.repeats < 1 or (self.repeats > 1 and not self.shuffle):
            raise ValueError("repeats (repeated augmentation) is >= 1, and for shuffled training loaders only.")
        if self.cache_bytes and self.shuffle:
            raise ValueError("cache_bytes is for evaluation loaders only (no shuffling, no augmentation).")

    @classmethod
    def training(cls, batch_size: int, **settings: Any) -> LoaderSpec:
        return cls(batch_size, shuffle=True, drop_last=True, **settings)

    @classmethod
    def evaluation(cls, batch_size: int, **settings: Any) -> LoaderSpec:
        return cls(batch_size, shuffle=False, drop_last=False, **settings)
