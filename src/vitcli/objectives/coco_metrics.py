"""COCO box AP (and mask AP) over a whole evaluation set, computed by pycocotools' COCOeval: the numbers every
detection paper (and detectron2, torchvision's references, mmdet) reports.

Predictions and ground truth arrive per image as torchvision's detection dicts (boxes as x0, y0, x1, y1 in
pixels; labels are the category ids, 0 being the background torchvision's heads reserve). They are kept
as COCO records (boxes as x, y, w, h) and judged once at the end: AP at IoU .50:.95, AP50, AP75 and AP of
small (< 32^2 px), medium and large objects, up to 100 detections per image. An area range without
ground truth has no AP (None, where pycocotools prints -1). Where both carry instance masks (Mask R-CNN's
(N, 1, H, W) probabilities, cut at 0.5, and the targets' (M, H, W) masks), the same six are computed on the
masks as well (COCOeval "segm", masks as compressed RLE): mask_ap, mask_ap50, ...
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import torch

from vitcli.data.instance_masks import encode_masks

STAT_KEYS = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
MASK_KEYS = tuple(f"mask_{k}" for k in STAT_KEYS)


def _xywh(boxes: torch.Tensor) -> list[list[float]]:
    b = boxes.detach().to("cpu", torch.float64)
    return torch.stack([b[:, 0], b[:, 1], b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]], dim=1).tolist()


class CocoAP:
    """Accumulates images' predictions and ground truth as COCO records; `results()` runs COCOeval (box,
    and mask where every image had masks on both sides)."""

    def __init__(self) -> None:
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.detections: list[dict] = []
        self.masked: bool | None = None  # every image so far had masks in its prediction and its target

    def update(self, predictions: Sequence[dict], targets: Sequence[dict]) -> None:
        """predictions: {boxes (N, 4), scores (N,), labels (N,), masks? (N, 1, H, W) in [0, 1]}; targets: {boxes
        (M, 4), labels (M,)} with optional iscrowd (M,), area (M,) (COCO's, the mask area; else the box's)
        and masks (M, H, W)."""
        for pred, target in zip(predictions, targets, strict=True):
            image_id = len(self.images) + 1
            masked = "masks" in pred and "masks" in target
            self._note_masked(masked)
            height, width = target["masks"].shape[-2:] if masked else (0, 0)
            self.images.append({"id": image_id, "height": int(height), "width": int(width)})
            boxes = _xywh(target["boxes"])
            crowd = target.get("iscrowd", torch.zeros(len(boxes), dtype=torch.int64)).tolist()
            areas = target["area"].tolist() if "area" in target else [w * h for _, _, w, h in boxes]
            truth_masks = encode_masks(target["masks"].cpu()) if masked else [None] * len(boxes)
            for box, label, is_crowd, area, mask in zip(boxes, target["labels"].tolist(), crowd, areas, truth_masks):
                self.annotations.append({"id": len(self.annotations) + 1, "image_id": image_id, "category_id": int(label),
                                         "bbox": box, "area": float(area), "iscrowd": int(is_crowd),
                                         **({"segmentation": mask} if mask else {})})
            found_masks = encode_masks((pred["masks"][:, 0] > 0.5).cpu()) if masked else [None] * len(pred["boxes"])
            for box, score, label, mask in zip(_xywh(pred["boxes"]), pred["scores"].tolist(), pred["labels"].tolist(), found_masks):
                self.detections.append({"image_id": image_id, "category_id": int(label), "bbox": box, "score": float(score),
                                        **({"segmentation": mask} if mask else {})})

    def _note_masked(self, masked: bool) -> None:
        self.masked = masked if self.masked is None else self.masked and masked

    def state(self) -> dict:
        """What another process needs to merge this one's records (gathered under DDP)."""
        return {"images": self.images, "annotations": self.annotations, "detections": self.detections, "masked": self.masked}

    def merge(self, other: dict) -> None:
        """Add another process's records, renumbering its images after this one's."""
        offset, ann_offset = len(self.images), len(self.annotations)
        if other["masked"] is not None:
            self._note_masked(other["masked"])
        self.images += [{**im, "id": im["id"] + offset} for im in other["images"]]
        self.annotations += [{**a, "id": a["id"] + ann_offset, "image_id": a["image_id"] + offset} for a in other["annotations"]]
        self.detections += [{**d, "image_id": d["image_id"] + offset} for d in other["detections"]]

    def results(self) -> dict:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        categories = sorted({a["category_id"] for a in self.annotations} | {d["category_id"] for d in self.detections})
        truth = COCO()
        truth.dataset = {"images": self.images, "annotations": self.annotations, "categories": [{"id": c} for c in categories]}
        kinds = {"bbox": STAT_KEYS, **({"segm": MASK_KEYS} if self.masked else {})}
        out: dict = {"num_images": len(self.images)}
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and table
            truth.createIndex()
            if not self.detections:  # loadRes refuses an empty list; nothing detected scores 0 where there is truth
                return out | {k: (0.0 if self.annotations else None) for keys in kinds.values() for k in keys}
            for kind, keys in kinds.items():
                # loadRes fills in ids and areas in place; for masks without the box, so an object's area (small,
                # medium, large) is its mask's, as detectron2 does
                found = truth.loadRes([{k: v for k, v in d.items() if not (kind == "segm" and k == "bbox")} for d in self.detections])
                judge = COCOeval(truth, found, kind)
                judge.evaluate()
                judge.accumulate()
                judge.summarize()
                out |= {k: (None if v < 0 else float(v)) for k, v in zip(keys, judge.stats[: len(keys)])}
        return out
