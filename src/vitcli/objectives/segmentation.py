"""Semantic segmentation (task: segmentation): per-pixel cross-entropy of a Segmenter's class maps, pixels
labelled 255 ignored; evaluation slides windows over each image (models/seg_infer.py) and sums one
confusion matrix over the whole split (objectives/seg_metrics.py); mIoU picks the best checkpoint.

    objective = SemanticSegmentation(segmenter, num_classes, window=512, stride=512)
    loss, _ = objective((images, masks))               # masks: (B, H, W) class ids, 255 ignored
    scores = objective.evaluate(model, batches, device, amp_dtype)   # miou, pixel_accuracy, mean_accuracy, ...
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitcli.data.masks import OUTSIDE
from vitcli.data.seg_transforms import resized_size
from vitcli.errors import VitError
from vitcli.models.seg_infer import segment
from vitcli.models.segmenter import Segmenter
from vitcli.objectives.base import Inputs, Objective
from vitcli.objectives.seg_metrics import IGNORE_INDEX, ConfusionMatrix


class SemanticSegmentation(Objective):
    name = "segmentation"
    best_metric = "miou"
    eval_metrics = ("miou", "pixel_accuracy", "mean_accuracy", "loss", "num_images", "images_per_second")

    @classmethod
    def from_recipe(cls, cfg, model: nn.Module, given: Inputs) -> SemanticSegmentation:
        if not isinstance(model, Segmenter):
            raise VitError("objective segmentation trains a Segmenter (a ViT with a decoder): set task: segmentation.")
        window = given.window or min(model.encoder.patch_embed.img_size)
        return cls(model, given.num_classes, window=window, stride=given.window_stride or window,
                   scales=given.eval_scales, flip=given.eval_flip)

    def __init__(self, model: Segmenter, num_classes: int, *, window: int, stride: int, scales: Sequence[float] = (1.0,),
                 flip: bool = False):
        super().__init__(model)
        self.num_classes, self.window, self.stride = num_classes, window, stride
        self.scales, self.flip = tuple(scales), flip

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, masks = batch
        return F.cross_entropy(self.model(images), masks, ignore_index=IGNORE_INDEX), {}

    def start_note(self) -> str | None:
        scales = "" if self.scales == (1.0,) else f", scales {', '.join(f'{s:g}' for s in self.scales)}"
        return (f"Segmentation: {type(self.model.decoder).__name__} decoder, per-pixel cross-entropy (255 ignored); evaluated "
                f"with {self.window}-px windows every {self.stride} px{scales}{', flipped too' if self.flip else ''}, by mIoU.")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, device: torch.device,
                 amp_dtype: torch.dtype | None) -> dict[str, Any]:
        return evaluate_segmentation(model, batches, self.num_classes, device, amp_dtype, window=self.window,
                                     stride=self.stride, scales=self.scales, flip=self.flip)

    def describe(self, metrics: dict[str, Any]) -> str:
        return f"mIoU {metrics['miou']:.4f}  pixel acc {metrics['pixel_accuracy']:.4f}  loss {metrics['loss']:.4f}"


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, batches: Iterable, num_classes: int, device: torch.device,
                          amp_dtype: torch.dtype | None, *, window: int, stride: int, scales: Sequence[float] = (1.0,),
                          flip: bool = False, on_batch=None) -> dict[str, Any]:
    """mIoU, pixel and mean accuracy (one confusion matrix over every pixel, all-reduced over processes),
    mean per-pixel cross-entropy, per-class IoU and images/s. `on_batch(images, scores, masks)` sees every batch."""
    was_training = model.training
    model.eval()
    matrix = ConfusionMatrix(num_classes)
    totals = torch.zeros(3, dtype=torch.float64)  # loss sum, labelled pixels, images
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    probabilities = len(scales) > 1 or flip  # the scores are averaged probabilities, not logits
    start = time.perf_counter()
    for images, masks in batches:
        images, masks = images.to(device, non_blocking=True), masks.to(device, non_blocking=True)
        if len(masks) == 0:  # a lockstep dummy (FSDP): every rank runs the same forwards
            with amp:
                model(images)
            continue
        for part, truth in _same_size(images, masks, window):
            with amp:
                scores = segment(model, part, num_classes, window, stride, scales, flip).float()
            if scores.shape[-2:] != truth.shape[-2:]:  # judged at the mask's (the image's own) resolution
                scores = F.interpolate(scores, size=truth.shape[-2:], mode="bilinear", align_corners=False)
            log_p = scores.clamp_min(1e-12).log() if probabilities else scores.log_softmax(1)
            target = torch.where(truth < 0, IGNORE_INDEX, truth)
            totals += torch.tensor([float(F.nll_loss(log_p, target, ignore_index=IGNORE_INDEX, reduction="sum")),
                                    float((target != IGNORE_INDEX).sum()), float(len(truth))], dtype=torch.float64)
            matrix.update(scores.argmax(1), target)
            if on_batch is not None:
                on_batch(part, scores, target)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for t in (matrix.matrix, totals):
            reduced = t.to(device)
            torch.distributed.all_reduce(reduced)
            t.copy_(reduced.cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.train(was_training)
    out = matrix.results()
    loss_sum, pixels, images_seen = totals.tolist()
    out.update(loss=loss_sum / max(pixels, 1.0), num_images=int(images_seen), seconds=seconds,
               images_per_second=images_seen / seconds if seconds > 0 else 0.0)
    return out


def _same_size(images: torch.Tensor, masks: torch.Tensor, short: int):
    """(images, masks) as they came when the batch's images share one size; else each image cut out of the
    batch's padding (its mask's extent gives its size, the evaluation resize its resized one)."""
    if not (masks == OUTSIDE).any():
        yield images, masks
        return
    for image, mask in zip(images, masks):
        inside = mask != OUTSIDE
        h, w = int(inside.any(1).sum()), int(inside.any(0).sum())
        rh, rw = resized_size(h, w, short)
        yield image[None, :, :rh, :rw], mask[None, :h, :w]
