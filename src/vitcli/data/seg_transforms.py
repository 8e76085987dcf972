"""Joint transforms of an image and its mask (torchvision transforms.v2 with tv_tensors.Mask): the same
geometry for both, nearest-neighbour for the mask, photometric changes for the image only.

Train (mmseg's / Segmenter's ADE20K pipeline): resize the shorter side to crop x U(scale) (0.5-2.0) ->
random crop of the crop size, padded where the image is smaller (image 0, mask 255: ignored) ->
horizontal flip -> colour jitter (mmseg's PhotoMetricDistortion ranges: brightness 32/255, contrast
and saturation 0.5, hue 18/255) -> normalise. mmseg's `cat_max_ratio` crop retries are not done.
Eval: resize the image's shorter side to the crop size -> normalise; the mask stays as it is, so the
scores are resized back to it and judged at the image's own resolution (mmseg's and Segmenter's test).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from vitcli.data.collate import padded_stack
from vitcli.data.masks import IGNORE_INDEX, OUTSIDE
from vitcli.errors import VitError


@dataclass(frozen=True)
class SegTransformSpec:
    """The joint transform's settings (a recipe's data section has them, under these names)."""

    crop_size: tuple[int, int] = (512, 512)
    resize_range: tuple[float, float] = (0.5, 2.0)
    hflip: float = 0.5
    photometric: bool = True
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)


class SegTransform:
    """(PIL image, (H, W) uint8 mask) -> (normalised float image (C, h, w), int64 mask (h, w)).

    `joint`: the loader passes the decoded mask with the image (data/collate.py)."""

    joint = True

    def __init__(self, spec: SegTransformSpec, train: bool):
        self.spec, self.train = spec, train
        self.mode = "L" if len(spec.mean) == 1 else "RGB"
        crop = tuple(int(c) for c in spec.crop_size)
        short = min(crop)
        if train:
            lo, hi = spec.resize_range
            steps = [v2.RandomResize(max(1, round(short * lo)), max(2, round(short * hi)) + 1, antialias=True),
                     v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX})]
            if spec.hflip > 0:
                steps.append(v2.RandomHorizontalFlip(spec.hflip))
            if spec.photometric:
                steps.append(v2.ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=18 / 255))
        else:
            steps = [v2.Resize(short, antialias=True)]  # the image only: see __call__
        self.short = short
        self.geometry = v2.Compose(steps)
        self.finish = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(spec.mean), list(spec.std))])

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        image = image if image.mode == self.mode else image.convert(self.mode)
        if image.size != (mask.shape[1], mask.shape[0]):
            raise VitError(f"its mask is {mask.shape[1]}x{mask.shape[0]} pixels but the image {image.size[0]}x{image.size[1]}; "
                           "a mask must match its image pixel for pixel.")
        pixels = tv_tensors.Image(torch.from_numpy(np.array(image)).reshape(image.size[1], image.size[0], -1).permute(2, 0, 1))
        mask_t = tv_tensors.Mask(torch.from_numpy(np.array(mask)))
        if self.train:
            pixels, mask_t = self.geometry(pixels, mask_t)
        else:
            pixels = self.geometry(pixels)
        return self.finish(pixels).as_subclass(torch.Tensor), mask_t.as_subclass(torch.Tensor).long()


    @staticmethod
    def collate(images: list[torch.Tensor], masks: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked, padded to the batch's largest: images with 0, masks with -1 (not part of the image;
        training crops are never padded, evaluation batches of different sizes are)."""
        return padded_stack(images, 0), padded_stack(masks, OUTSIDE)


def resized_size(height: int, width: int, short: int) -> tuple[int, int]:
    """The size the evaluation transform gives an image of (height, width): shorter side `short`, the
    longer one scaled and truncated (torchvision's Resize(int))."""
    if height <= width:
        return short, int(short * width / height)
    return int(short * height / width), short
