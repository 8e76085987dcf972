"""COCO box AP over a whole evaluation set, computed by pycocotools' COCOeval: the numbers every detection
paper (and detectron2, torchvision's references, mmdet) reports.

Predictions and ground truth arrive per image as torchvision's detection dicts (boxes as x0, y0, x1, y1 in
pixels; labels are the category ids, 0 being the background torchvision's heads reserve). They are kept
as COCO records (boxes as x, y, w, h) and judged once at the end: AP at IoU .50:.95, AP50, AP75 and AP of
small (< 32^2 px), medium and large objects, up to 100 detections per image. An area range without
ground truth has no AP (None, where pycocotools prints -1).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import torch

STAT_KEYS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")


def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    b = boxes.detach().to("cpu", torch.float64)
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1).tolist()


class CocoBoxAP:
    """Accumulates images' predictions and ground truth as COCO records; `results()` runs COCOeval."""

    def __init__(self) -> None:
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.detections: list[dict] = []

    def update(self, predictions: Sequence[dict], targets: Sequence[dict]) -> None:
        """predictions: {boxes (N, 4), scores (N,), labels (N,)}; targets: {boxes (M, 4), labels (M,)} with
        optional iscrowd (M,) and area (M,) (COCO's, the mask area; else the box's)."""
        for pred, target in zip(predictions, targets, strict=True):
            image_id = len(self.images) + 1
            self.images.append({"id": image_id})
            boxes = _xywh(target["boxes"])
            crowd = target.get("iscrowd", torch.zeros(len(boxes), dtype=torch.int64)).tolist()
            areas = target["area"].tolist() if "area" in target else [w * h for _, _, w, h in boxes]
            for box, label, is_crowd, area in zip(boxes, target["labels"].tolist(), crowd, areas):
                self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id, "category_id": int(label),
                                         "bbox": box, "area": float(area), "iscrowd": int(is_crowd)})
            for box, score, label in zip(_xywh(pred["boxes"]), pred["scores"].tolist(), pred["labels"].tolist()):
                self.detections.append({"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score)})

    def state(self) -> dict:
        """What another process needs to merge this one's records (gathered under DDP)."""
        return {"images": self.images, "annotations": self.annotations, "detections": self.detections}

    def merge(self, other: dict) -> None:
        """Add another process's records, renumbering its images after this one's."""
        offset, ann_offset = len(self.images), len(self.annotations)
        self.images += [{"id": im["id"] + offset} for im in other["images"]]
        self.annotations += [{**a, "id": a["id"] + ann_offset, "image_id": a["image_id"] + offset} for a in other["annotations"]]
        self.detections += [{**d, "image_id": d["image_id"] + offset} for d in other["detections"]]

    def results(self) -> dict:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        categories = sorted({a["category_id"] for a in self.annotations} | {d["category_id"] for d in self.detections})
        truth = COCO()
        truth.dataset = {"images": self.images, "annotations": self.annotations, "categories": [{"id": c} for c in categories]}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
            truth.createIndex()
            if not self.detections:  # loadRes refuses an empty list; nothing detected scores 0 where there is truth
                return {k: (0.0 if self.annotations else None) for k in STAT_KEYS} | {"num_images": len(self.images)}
            found = truth.loadRes(self.detections)
            judge = COCOeval(truth, found, "bbox")
            judge.evaluate()
            judge.accumulate()
            judge.summarize()
        stats = {k: (None if v < 0 else float(v)) for k, v in zip(STAT_KEYS, judge.stats[: len(STAT_KEYS)])}
        return stats | {"num_images": len(self.images)}
