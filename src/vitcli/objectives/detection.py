"""Object detection (task: detection): the sum of a torchvision detector's own losses (RPN objectness and
boxes, RoI classification and boxes for Faster R-CNN, and masks for Mask R-CNN; focal loss and boxes for
RetinaNet; FCOS's three); evaluation runs the detector on the evaluation images as they are and judges its
boxes (and masks) by COCO AP (pycocotools, objectives/coco_metrics.py, gathered over processes); box AP
picks the best checkpoint.

    objective = Detection(detector)
    loss, parts = objective((images, targets))          # lists: (C, H, W) tensors, {boxes, labels} dicts
    scores = objective.evaluate(model, batches, device, amp_dtype)   # ap, ap50, ap75, ap_small, ...
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from vitcli.errors import VitError
from vitcli.models.detector import Detector
from vitcli.objectives.base import Inputs, Objective
from vitcli.objectives.coco_metrics import MASK_KEYS, STAT_KEYS, CocoAP


class Detection(Objective):
    name = "detection"
    best_metric = "ap"

    @property
    def eval_metrics(self) -> tuple[str, ...]:
        return (*STAT_KEYS, *(MASK_KEYS if self.model.masks else ()), "num_images", "images_per_second")

    @classmethod
    def from_recipe(cls, cfg, model: nn.Module, given: Inputs) -> Detection:
        if not isinstance(model, Detector):
            raise VitError("objective detection trains a detector (a ViT under a feature pyramid and detection heads): "
                           "set task: detection.")
        return cls(model)

    def forward(self, batch: tuple[list[torch.Tensor], list[dict]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, targets = batch
        losses = self.model(list(images), list(targets))
        return sum(losses.values()), {k: v.detach() for k, v in losses.items()}

    def start_note(self) -> str | None:
        spec = self.model.spec
        windows = f"{spec.window_size}-patch windows, global blocks {list(spec.global_blocks)}" if spec.window_size else "global attention"
        return (f"Detection: {spec.kind} (torchvision) on a simple feature pyramid ({spec.channels} channels, {windows}); "
                f"images resized to {spec.size} px on the longer side; judged by COCO box{' and mask' if self.model.masks else ''} AP.")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable, device: torch.device,
                 amp_dtype: torch.dtype | None) -> dict[str, Any]:
        return evaluate_detection(model, batches, device, amp_dtype)

    def score(self, metrics: dict[str, Any]) -> float:
        return float(metrics["ap"] or 0.0)

    def describe(self, metrics: dict[str, Any]) -> str:
        boxes = f"AP {metrics['ap'] or 0:.4f}  AP50 {metrics['ap50'] or 0:.4f}  AP75 {metrics['ap75'] or 0:.4f}"
        return boxes + (f"  mask AP {metrics['mask_ap'] or 0:.4f}" if "mask_ap" in metrics else "")


@torch.no_grad()
def evaluate_detection(model: nn.Module, batches: Iterable, device: torch.device, amp_dtype: torch.dtype | None,
                       on_batch=None) -> dict[str, Any]:
    """COCO box AP of `model`'s detections over every batch (records gathered from all processes), and
    images/s. `on_batch(images, detections, targets)` sees every batch."""
    was_training = model.training
    model.eval()
    judge = CocoAP()
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    start = time.perf_counter()
    for images, targets in batches:
        images = [image.to(device, non_blocking=True) for image in images]
        with amp:
            found = model(images)
        found = [{k: _to_host(k, v) for k, v in f.items()} for f in found]
        targets = [{k: v.cpu() for k, v in t.items()} for t in targets]
        judge.update(found, targets)
        if on_batch is not None:
            on_batch(images, found, targets)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, judge.state())
        judge = CocoAP()
        for part in gathered:
            judge.merge(part)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.train(was_training)
    out = judge.results()
    out.update(seconds=seconds, images_per_second=out["num_images"] / seconds if seconds > 0 else 0.0)
    return out


def _to_host(key: str, value: torch.Tensor) -> torch.Tensor:
    """A detection's field on the CPU; masks cut at 0.5 first (bool, a quarter of the float's copy)."""
    if key == "masks":
        return (value > 0.5).cpu()
    return value.float().cpu() if value.is_floating_point() else value.cpu()
