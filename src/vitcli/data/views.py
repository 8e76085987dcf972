"""Several augmented views of each training image (multi-crop), for objectives that compare views (DINO).

A ViewSpec lists groups of views; each view is a RandomResizedCrop at the group's size and scale, the
recipe's flip, then the group's photometric changes, then the recipe's normalisation. The loader stacks
each view across the batch, so a batch's images are a tuple of (N, C, H, W) tensors, one per view, in
the spec's order (DINO: the two global crops first). One view of one group is the plain pipeline's
crop: supervised, MAE and DINO take their images from the same loader, transform by transform.

    views = ViewSpec.dino((224, 224), (0.4, 1.0), local_number=8, local_size=96, local_scale=(0.05, 0.4))
    transform = build_views_transform(TransformSpec.of(recipe.data), views)
    transform(pil_image)  # (global 1, global 2, local 1 ... local 8)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms.functional import pil_to_tensor

from vitcli.data.specs import TransformSpec
from vitcli.data.transforms import RandomBlur, ToMode
from vitcli.errors import VitError

# DINO's photometric augmentation (main_dino.py, DataAugmentationDINO)
JITTER = dict(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
JITTER_P, GRAYSCALE_P = 0.8, 0.2
BLUR_REFERENCE = 224  # the view size at which DINO's blur radius (0.1-2 px) is stated


@dataclass(frozen=True)
class ViewGroup:
    """`count` views at `size`, cropped at `scale` of the image's area, with the photometric changes'
    probabilities (DINO's colour jitter and greyscale, a Gaussian blur of radius 0.1-2 px at 224 px and in
    proportion at other sizes, solarization)."""

    count: int
    size: tuple[int, int]
    scale: tuple[float, float]
    blur: float = 0.0
    solarize: float = 0.0
    jitter: float = JITTER_P
    grayscale: float = GRAYSCALE_P


@dataclass(frozen=True)
class ViewSpec:
    groups: tuple[ViewGroup, ...]

    @property
    def count(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Each view's (height, width), in batch order."""
        return [g.size for g in self.groups for _ in range(g.count)]

    @classmethod
    def dino(cls, global_size: tuple[int, int], global_scale: tuple[float, float], *, local_number: int,
             local_size: int, local_scale: tuple[float, float], jitter: float = JITTER_P, grayscale: float = GRAYSCALE_P,
             solarize: float = 0.2, blur: bool = True) -> ViewSpec:
        """DINO's multi-crop: two global crops (the first always blurred; the second blurred 10% of the
        time and solarized 20%) and `local_number` small ones (blurred half the time); every crop gets the
        colour jitter (80%) and greyscale (20%). The probabilities can be changed, the blur turned off."""
        photo = dict(jitter=jitter, grayscale=grayscale)
        groups = [ViewGroup(1, global_size, global_scale, blur=1.0 * blur, **photo),
                  ViewGroup(1, global_size, global_scale, blur=0.1 * blur, solarize=solarize, **photo)]
        if local_number:
            groups.append(ViewGroup(local_number, (local_size, local_size), local_scale, blur=0.5 * blur, **photo))
        return cls(tuple(groups))


class MultiView:
    """PIL image -> tuple of normalised tensors, one per view of the spec."""

    def __init__(self, spec: TransformSpec, views: ViewSpec):
        self.to_mode = ToMode("L" if len(spec.mean) == 1 else "RGB")  # once per image, not per view
        self.views = views
        self.pipelines = [self._pipeline(spec, group) for group in views.groups]

    @staticmethod
    def _pipeline(spec: TransformSpec, g: ViewGroup) -> transforms.Compose:
        # a change with probability 0 is left out rather than drawn for (at 8 px a view costs ~100 us, each
        # RandomApply ~6-20 of them)
        steps = [transforms.RandomResizedCrop(g.size, scale=g.scale, interpolation=transforms.InterpolationMode(spec.interpolation))]
        if spec.hflip:
            steps.append(transforms.RandomHorizontalFlip(spec.hflip))
        if g.jitter:
            steps.append(transforms.RandomApply([transforms.ColorJitter(**JITTER)], p=g.jitter))
        if g.grayscale:
            steps.append(transforms.RandomGrayscale(g.grayscale))
        if g.blur:  # DINO's radius 0.1-2 px at 224 px, in proportion at other sizes (2 px would erase an 8 px digit)
            scale = min(g.size) / BLUR_REFERENCE
            steps.append(transforms.RandomApply([RandomBlur(0.1 * scale, 2.0 * scale)], p=g.blur))
        if g.solarize:
            steps.append(transforms.RandomSolarize(threshold=128, p=g.solarize))
        steps.append(Normalized(spec.mean, spec.std))
        return transforms.Compose(steps)

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, ...]:
        img = self.to_mode(img)
        return tuple(pipeline(img) for pipeline, g in zip(self.pipelines, self.views.groups) for _ in range(g.count))

    def __repr__(self) -> str:
        return f"MultiView({self.views})"


class Normalized:
    """PIL image -> float (C, H, W), (x / 255 - mean) / std: ToTensor then Normalize in one pass (a third
    of their cost on small views)."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        self.mean = torch.tensor(mean, dtype=torch.float32).mul(255).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).mul(255).view(-1, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return pil_to_tensor(img).float().sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return "Normalized()"


def build_views_transform(spec: TransformSpec, views: ViewSpec) -> MultiView:
    """The training transform of an objective that takes several views per image (PIL pipeline)."""
    if spec.pipeline == "tensor":
        raise VitError("data.pipeline: tensor crops one view per image; this objective takes several (multi-crop). "
                       "Set data.pipeline: pil (or auto).")
    return MultiView(spec, views)
