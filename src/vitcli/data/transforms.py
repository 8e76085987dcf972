"""Image transforms, Mixup/CutMix and the matching loss, all from timm.data (the PIL pipeline; the
tensor pipeline's equivalents are in tensor_transforms.py).

Train: RandomResizedCrop(crop_scale, crop_ratio) -> horizontal flip -> RandAugment (optional) ->
to tensor -> normalise -> random erasing (optional). Colour jitter is off: the ViT recipes do not use it,
and timm turns it off whenever RandAugment is on.
Eval: resize to img_size / crop_pct -> centre crop -> to tensor -> normalise.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
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
                re_prob=cfg.random_erasing, re_mode="pixel", **common,
            )
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


class _Mixup(Mixup):
    """timm Mixup that also accepts odd batches in 'batch' mode (a batch can lose an unreadable image)."""

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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


def build_train_loss(cfg: MixSpec) -> nn.Module:
    """Soft-target cross-entropy when mixing (targets are soft), else cross-entropy with label smoothing."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
