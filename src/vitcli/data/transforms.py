"""Image transforms, Mixup/CutMix and the matching loss, all from timm.data (the PIL pipeline; the
tensor pipeline's equivalents are in tensor_transforms.py).

Train: RandomResizedCrop(crop_scale, crop_ratio) (or DeiT III's simple crop) -> horizontal flip ->
RandAugment (optional) -> 3-Augment, colour jitter (DeiT III, optional) -> to tensor -> normalise ->
random erasing (optional).
Eval: resize to img_size / crop_pct -> centre crop -> to tensor -> normalise.
"""

from __future__ import annotations

import random
from typing import Callable, Optional

import torch
from PIL import Image, ImageFilter
from timm.data import Mixup, create_transform
from timm.data.mixup import mixup_target
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torchvision import transforms

from vitcli.data.tensor_transforms import TensorTransform
from vitcli.errors import VitError
from vitcli.data.specs import MixSpec, TransformSpec


class ToMode:
    """Convert a PIL image to 'RGB' or 'L' (grayscale data feeds 3-channel models and vice versa)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, img: Image.Image) -> Image.Image:
        return img if img.mode == self.mode else img.convert(self.mode)

    def __repr__(self) -> str:
        return f"ToMode({self.mode!r})"


def build_transform(cfg: TransformSpec, img_size: tuple[int, int], train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """The recipe's transform: a TensorTransform (data.pipeline tensor) or timm's PIL Compose.

    Either is callable on a PIL image -> normalised float tensor (C, H, W), C = len(cfg.mean); the
    loader drives a TensorTransform in two halves (host: decode/crop in uint8; device: normalise).
    """
    size = tuple(int(s) for s in img_size) if not isinstance(img_size, int) else (img_size, img_size)
    if cfg.tensor_pipeline:
        return TensorTransform(cfg, size, train)
    common = dict(interpolation=cfg.interpolation, mean=tuple(cfg.mean), std=tuple(cfg.std))
    try:
        if train:
            tf = create_transform(
                size, is_training=True, scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio),
                hflip=cfg.hflip, color_jitter=None, auto_augment=cfg.randaugment or None,
                re_prob=cfg.random_erasing, re_mode="pixel", separate=True, **common,
            )
            tf = transforms.Compose(deit3_stages(cfg, size, *tf))
        else:
            tf = create_transform(size, is_training=False, crop_pct=cfg.crop_pct, **common)
    except (AssertionError, ValueError, KeyError) as e:
        if cfg.randaugment:
            raise VitError(
                f"data.randaugment '{cfg.randaugment}' is not a timm augmentation spec ({e}). "
                "Use e.g. rand-m9-mstd0.5 or rand-m9-mstd0.5-inc1, or null to turn it off."
            ) from e
        raise
    return transforms.Compose([ToMode("L" if len(cfg.mean) == 1 else "RGB"), *tf.transforms])


class RandomBlur:
    """PIL Gaussian blur with a radius drawn uniformly from [low, high] (DeiT III's and DINO's)."""

    def __init__(self, low: float = 0.1, high: float = 2.0) -> None:
        self.low, self.high = low, high

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.low, self.high)))

    def __repr__(self) -> str:
        return f"RandomBlur(radius=({self.low}, {self.high}))"


def deit3_stages(cfg: TransformSpec, size: tuple[int, int], primary, secondary, final) -> list:
    """timm's three stages (crop + flip, RandAugment, tensor + normalise + erasing) with DeiT III's choices:
    a simple crop for the primary stage, 3-Augment and colour jitter as the secondary (Touvron et al., 2022)."""
    first, second = list(primary.transforms), list(secondary.transforms)
    if cfg.simple_crop:
        resample = transforms.InterpolationMode(cfg.interpolation)
        first = [transforms.Resize(size, interpolation=resample),
                 transforms.RandomCrop(size, padding=4, padding_mode="reflect"),
                 *[t for t in first if isinstance(t, transforms.RandomHorizontalFlip)]]
    if cfg.three_augment:
        second.append(transforms.RandomChoice([transforms.Grayscale(num_output_channels=len(cfg.mean)),
                                               transforms.RandomSolarize(threshold=128, p=1.0), RandomBlur()]))
    if cfg.color_jitter:
        second.append(transforms.ColorJitter(cfg.color_jitter, cfg.color_jitter, cfg.color_jitter))
    return [*first, *second, *final.transforms]


class _Mixup(Mixup):
    """timm Mixup that also accepts odd batches in 'batch' mode (a batch can lose an unreadable image)."""

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if target.ndim == 2:  # multi-hot targets (multi-label): mixed with the same weight as the images
            lam = self._mix_batch(x)
            return x, target * lam + target.flip(0) * (1.0 - lam)
        if len(x) % 2 == 0 or self.mode != "batch":
            return super().__call__(x, target)
        # batch mode mixes x with x.flip(0), which pairs the middle image with itself: still valid.
        lam = self._mix_batch(x)
        return x, mixup_target(target, self.num_classes, lam, self.label_smoothing, self.multi_label)


def build_mixup(cfg: MixSpec, num_classes: int) -> Optional[Mixup]:
    """timm Mixup/CutMix (label smoothing folded into its soft targets), or None when both are off.

    Call it on each training batch on the device: `images, targets = mixup(images, labels)`. It draws from
    the global numpy / python RNGs, so checkpoint those with the torch RNG.
    """
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    return _Mixup(
        mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.label_smoothing,
        num_classes=num_classes,
    )


class WeightedSoftTargetCrossEntropy(nn.Module):
    """Soft-target cross-entropy with a weight per class: mean over images of -sum_c w_c t_c log p_c."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -(target * x.log_softmax(dim=-1) * self.weight).sum(dim=-1).mean()


def build_train_loss(cfg: MixSpec, class_counts=None, multilabel: bool = False) -> nn.Module:
    """Soft-target cross-entropy when mixing (targets are soft), else cross-entropy with label smoothing; with
    loss bce, timm's binary cross-entropy (DeiT III) on the same targets (class ids become smoothed one-hot).
    balance loss_weights weighs each class (data/balance.py) from `class_counts` of the training split.
    Multi-label data: binary cross-entropy on the multi-hot (or mixed) targets."""
    if multilabel:
        return BinaryCrossEntropy()
    weight = None
    if cfg.balance == "loss_weights":
        from vitcli.data.balance import loss_weights

        if class_counts is None:
            raise VitError("data.balance: loss_weights needs the training split's class counts, and none were given. "
                           "Use a map-style set or shards written by `vit shards`, or data.balance: none.")
        weight = loss_weights(class_counts, cfg.class_weights, cfg.effective_beta)
    if cfg.loss == "bce":
        return BinaryCrossEntropy(smoothing=cfg.label_smoothing, weight=weight)
    if cfg.mixup > 0 or cfg.cutmix > 0:
        return SoftTargetCrossEntropy() if weight is None else WeightedSoftTargetCrossEntropy(weight)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)
