"""Joint transforms of an image and its boxes (torchvision transforms.v2 with tv_tensors.BoundingBoxes), and
its objects' masks where it has them (tv_tensors.Mask, resized nearest), so boxes and masks follow every
resize, crop and flip of their image.

Train (ViTDet's large-scale jitter, as detectron2's LSJ config): resize keeping the aspect ratio so the
image fits size x U(scale_range) (0.1-2.0: v2.ScaleJitter) -> random size x size crop, padded with 0
where the image is smaller -> horizontal flip -> drop boxes cut to nothing (v2.SanitizeBoundingBoxes).
Crowd regions are left out of training, as detectron2 does. Masks leave as uint8 (M, h, w) `masks`.
Eval: the image as it is; the detector's own transform resizes it (longer side to `size`) and maps its
boxes back, so predictions are judged against the annotations at the image's own resolution.

Images leave as float (C, H, W) in [0, 1], unnormalised: torchvision's detectors normalise them inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from vitcli.data.instance_masks import decode_masks


@dataclass(frozen=True)
class DetTransformSpec:
    """The joint transform's settings (a recipe's data section has them)."""

    size: int = 1024
    scale_range: tuple[float, float] = (0.1, 2.0)
    hflip: float = 0.5
    channels: int = 3


class DetTransform:
    """(PIL image, target of data/boxes.decode_objects) -> (float image (C, h, w), target with boxes moved).

    `joint`: the loader passes the decoded target with the image; `collate` keeps a batch's images and
    targets as lists (images differ in size and in their number of boxes)."""

    joint = True

    def __init__(self, spec: DetTransformSpec, train: bool):
        self.spec, self.train = spec, train
        self.mode = "L" if spec.channels == 1 else "RGB"
        steps = []
        if train:
            square = (spec.size, spec.size)
            steps = [v2.ScaleJitter(square, scale_range=tuple(spec.scale_range), antialias=True),
                     v2.RandomCrop(square, pad_if_needed=True, fill=0)]
            if spec.hflip > 0:
                steps.append(v2.RandomHorizontalFlip(spec.hflip))
            steps.append(v2.SanitizeBoundingBoxes())
        self.geometry = v2.Compose(steps) if steps else None
        self.to_float = v2.ToDtype(torch.float32, scale=True)

    def __call__(self, image: Image.Image, target: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = image if image.mode == self.mode else image.convert(self.mode)
        w, h = image.size
        pixels = tv_tensors.Image(torch.from_numpy(np.array(image)).reshape(h, w, -1).permute(2, 0, 1))
        if "segmentation" in target:  # each object's mask, decoded at the image's size
            target = {k: v for k, v in target.items() if k != "segmentation"} | {
                "masks": decode_masks(target["segmentation"], target["boxes"], h, w)}
        if not self.train:
            return self.to_float(pixels).as_subclass(torch.Tensor), target
        keep = target["iscrowd"] == 0
        objects = {"boxes": tv_tensors.BoundingBoxes(target["boxes"][keep], format="XYXY", canvas_size=(h, w)),
                   "labels": target["labels"][keep]}
        if "masks" in target:
            objects["masks"] = tv_tensors.Mask(target["masks"][keep])
        pixels, moved = self.geometry(pixels, objects)
        return self.to_float(pixels).as_subclass(torch.Tensor), {k: v.as_subclass(torch.Tensor) for k, v in moved.items()}

    @staticmethod
    def collate(images: list[torch.Tensor], targets: list[dict]) -> tuple[list[torch.Tensor], list[dict]]:
        return images, targets
