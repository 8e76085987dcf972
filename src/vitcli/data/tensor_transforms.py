"""The recipe's transforms on uint8 tensors (data.pipeline: tensor), split so a GPU can do the pixel work.

`plan(width, height)` draws an image's random parameters (RandomResizedCrop box, flip) with exactly
the draws timm's PIL transforms make (python `random` for the box via timm's own get_params, then
`torch.rand(1)` for the flip), so under the loader's per-image seeding an image gets the same crop and
flip in both pipelines. `apply(image, plan)` crops, resizes (antialiased, torchvision.transforms.v2)
and flips a uint8 (C, H, W) tensor on whatever device it is on; `normalize(batch)` turns a uint8 batch
into the model's float input on its device. Planning needs only the image size, so a worker can plan
from a JPEG header and leave decoding and resizing to the GPU, or pick how small a host decode may
be (`reduction`): a crop of at least twice the output size on both sides loses nothing by being
decoded at half size, since the resize would average those pixels away. `resize_cuts` does apply's
resize and flip for a whole batch of crops already cut from decoded pixels (data.cache), on the device, in
threads on a CPU.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data import create_transform
from timm.data.transforms import RandomResizedCropAndInterpolation, ResizeKeepRatio
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms.functional import pil_to_tensor

from vitcli.data.decode import REDUCTIONS
from vitcli.data.specs import TransformSpec


_TENSOR_MODE = {"nearest": InterpolationMode.NEAREST_EXACT}


class CropPlan(NamedTuple):
    top: int
    left: int
    height: int
    width: int
    flip: bool

    def reduced(self, factor: int, image_height: int, image_width: int) -> CropPlan:
        """The same box on the image decoded at 1/factor (image_height x image_width), in whole pixels."""
        if factor == 1:
            return self
        top, left = min(round(self.top / factor), image_height - 1), min(round(self.left / factor), image_width - 1)
        height = max(1, min(round(self.height / factor), image_height - top))
        width = max(1, min(round(self.width / factor), image_width - left))
        return CropPlan(top, left, height, width, self.flip)


class TensorTransform:
    """uint8 image tensor -> resized uint8 tensor -> (batched, on device) normalised float.

    Train: RandomResizedCrop(crop_scale, crop_ratio) -> horizontal flip. Eval: timm's resize to
    img_size / crop_pct -> centre crop. RandAugment and random erasing exist only as timm PIL
    transforms: recipes using them run the PIL pipeline (data.pipeline: auto picks it).
    """

    def __init__(self, cfg: TransformSpec, img_size: tuple[int, int], train: bool):
        self.size = [int(s) for s in img_size]
        self.train = train
        self.mode = "L" if len(cfg.mean) == 1 else "RGB"
        # Tensor "nearest" samples half a pixel off PIL's NEAREST; "nearest-exact" is PIL's rule.
        self.interpolation = _TENSOR_MODE.get(cfg.interpolation, InterpolationMode(cfg.interpolation))
        self.scale, self.ratio, self.hflip = tuple(cfg.crop_scale), tuple(cfg.crop_ratio), cfg.hflip
        self.reduced_decode = cfg.reduced_decode
        # Per channel, in 0..255 units: (x - 255 mean) / (255 std) == Normalize(ToTensor(x)).
        self.mean = torch.tensor(cfg.mean, dtype=torch.float32).mul(255).view(-1, 1, 1)
        self.std = torch.tensor(cfg.std, dtype=torch.float32).mul(255).view(-1, 1, 1)
        self._on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # Eval geometry: timm's own resize and centre-crop objects, which accept tensors.
        eval_tf = create_transform(tuple(self.size), is_training=False, crop_pct=cfg.crop_pct,
                                   interpolation=cfg.interpolation)
        self.eval_ops = [t for t in eval_tf.transforms if not isinstance(t, (transforms.ToTensor, transforms.Normalize))]
        for op in self.eval_ops:
            if getattr(op, "interpolation", None) == InterpolationMode.NEAREST:
                op.interpolation = InterpolationMode.NEAREST_EXACT
        # The eval resize scales the image by max(size) / short side at most (Resize(S): short side to
        # S; ResizeKeepRatio: to cover the box), so a short side of f x max(size) allows 1/f decoding.
        resize_size = self.eval_ops[0].size
        self.eval_resize = max(resize_size) if isinstance(resize_size, (list, tuple)) else int(resize_size)

    def plan(self, width: int, height: int) -> Optional[CropPlan]:
        """The image's random parameters (from the global RNGs); None for evaluation (no randomness)."""
        if not self.train:
            return None
        size_proxy = torch.empty((0, height, width))  # get_params reads only the size
        top, left, h, w = RandomResizedCropAndInterpolation.get_params(size_proxy, self.scale, self.ratio)
        flip = self.hflip > 0 and bool(torch.rand(1) < self.hflip)  # torchvision's RandomHorizontalFlip draw
        return CropPlan(top, left, h, w, flip)

    def reduction(self, width: int, height: int, plan: Optional[CropPlan]) -> int:
        """By how much (8, 4, 2 or 1) a width x height image may be decoded smaller for this plan:
        the largest factor that leaves the resize at least the output's pixels on both sides."""
        if not self.reduced_decode:
            return 1
        if plan is None:  # (pixels the image has, pixels the resize needs) per side
            sides = [(min(width, height), self.eval_resize)]
        else:
            sides = [(plan.height, self.size[0]), (plan.width, self.size[1])]
        return next((f for f in REDUCTIONS if all(have // f >= need for have, need in sides)), 1)

    def apply(self, image: torch.Tensor, plan: Optional[CropPlan]) -> torch.Tensor:
        """uint8 (C, H, W) -> uint8 (C, *img_size), on image's device."""
        if plan is None:
            resize, *rest = self.eval_ops
            # timm's geometry, torchvision v2's kernel: v1 resizes uint8 through float, 6-8x slower
            size = resize.get_params(image, resize.size, resize.longest) if isinstance(resize, ResizeKeepRatio) else resize.size
            image = _resized(image, size, resize.interpolation)
            for op in rest:
                image = op(image)
            return image
        crop = image[..., plan.top:plan.top + plan.height, plan.left:plan.left + plan.width]  # always inside the image
        out = _resized(crop, self.size, self.interpolation)
        return TF.horizontal_flip(out) if plan.flip else out

    def resize_cuts(self, cuts, device: torch.device) -> torch.Tensor:
        """Crops already cut to their plans' boxes (data/batches.Cuts: one flat uint8 buffer of (h, w, C)
        images) -> uint8 (N, C, *img_size) on `device`: one copy there, then each crop resized and flipped as
        `apply` does (the same kernel on the same pixels: the same batch, tested), in threads on a CPU."""
        flat = cuts.pixels.to(device, non_blocking=True)
        sizes = [h * w * c for h, w, c in cuts.shapes]
        crops = [part.view(shape).permute(2, 0, 1) for part, shape in zip(flat.split(sizes), cuts.shapes)]
        out = torch.empty((len(crops), cuts.shapes[0][2], *self.size), dtype=torch.uint8, device=device)

        def some(ks: range) -> None:
            for k in ks:  # the crop is the whole of its plan's box now
                out[k].copy_(self.apply(crops[k], cuts.plans[k]._replace(top=0, left=0)))

        threads = max(1, torch.get_num_threads()) if device.type == "cpu" else 1
        if threads > 1 and len(crops) > 1:  # torch's kernels release the GIL: a share of the batch per thread
            list(_threads(threads).map(some, [range(t, len(crops), threads) for t in range(threads)]))
        else:
            some(range(len(crops)))
        return out

    def normalize(self, batch: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """uint8 (N, C, H, W) on any device -> float32 normalised, same device (into `out` when given)."""
        if batch.device not in self._on_device:  # copied once: a per-batch copy would stall the GPU queue
            self._on_device[batch.device] = (self.mean.to(batch.device), self.std.to(batch.device))
        mean, std = self._on_device[batch.device]
        return (batch.float() if out is None else out.copy_(batch)).sub_(mean).div_(std)

    def __call__(self, image: Union[Image.Image, torch.Tensor]) -> torch.Tensor:
        """One image (PIL or uint8 tensor) -> normalised float (C, H, W); the PIL transforms' signature."""
        if isinstance(image, Image.Image):
            image = pil_to_tensor(image if image.mode == self.mode else image.convert(self.mode))
        out = self.apply(image, self.plan(image.shape[-1], image.shape[-2]))
        return self.normalize(out[None])[0]

    def __repr__(self) -> str:
        steps = ["RandomResizedCrop", "HorizontalFlip"] if self.train else [type(t).__name__ for t in self.eval_ops]
        return f"TensorTransform({' -> '.join(steps)}, size={self.size}, {self.interpolation.value})"


@functools.lru_cache(maxsize=None)
def _threads(n: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=n, thread_name_prefix="vitcli-resize")


def _resized(image: torch.Tensor, size, interpolation: InterpolationMode) -> torch.Tensor:
    """torchvision's antialiased resize of a (C, H, W) image, run channels-last: on a CPU, uint8 images
    then take torch's vectorised uint8 kernels (2-4x faster than planar), called directly (torchvision's
    wrapper costs as much again per image for the same call: the same pixels, tested)."""
    if image.dtype != torch.uint8 or image.device.type != "cpu" or interpolation not in _CHANNELS_LAST_FAST:
        return TF.resize(image, size, interpolation=interpolation, antialias=True)
    batch = image[None].contiguous(memory_format=torch.channels_last)
    if isinstance(size, int) or len(size) != 2:  # "the short side to S" (evaluation): torchvision's rule for the other side
        return TF.resize(batch, size, interpolation=interpolation, antialias=True)[0]
    return F.interpolate(batch, size=tuple(size), mode=_CHANNELS_LAST_FAST[interpolation], antialias=True, align_corners=False)[0]


_CHANNELS_LAST_FAST = {InterpolationMode.BILINEAR: "bilinear", InterpolationMode.BICUBIC: "bicubic"}
