"""Detection sets: each image with its objects (boxes and categories), one split as a `BoxSet`.

Every source ends as a `datasets.Dataset` in the Hugging Face detection schema: an encoded Image()
column `image` and a column `objects` of {bbox: [[x, y, w, h], ...] (COCO's, in pixels), category: [c,
...] (0-based), optional iscrowd, area and segmentation (each object's mask, COCO compressed RLE counts over the
image: data/instance_masks.py)}, as a classification source ends with image and label, so loading, subsets
and caching take one path (data/det_sources.py builds them).

torchvision's detectors reserve label 0 for the background: category c is label c + 1 in the targets
(`decode_objects`), and a detector for K categories has K + 1 classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import datasets
import torch


@dataclass
class BoxSet:
    """One split of a detection set: `dataset` has columns image (encoded Image()) and objects."""

    dataset: datasets.Dataset
    num_classes: int  # categories, background not counted
    class_names: list[str]
    name: str
    split: str

    multilabel = False
    target_column = "objects"  # what the loader reads beside the image

    def __len__(self) -> int:
        return len(self.dataset)

    def target_decoder(self) -> Callable[[dict], dict]:
        """What turns an objects cell into a torchvision target (picklable: loader workers call it)."""
        return decode_objects

    @property
    def instance_masks(self) -> bool:
        """Whether the objects carry masks (as a streamed ShardSet says from its index)."""
        return has_masks(self.dataset)


OBJECT_FIELDS = ("bbox", "category", "iscrowd", "area", "segmentation")  # the HF detection schema's, as vitcli reads them


def objects_feature(masks: bool = False, category=None) -> datasets.Sequence:
    """The objects column's type: boxes, categories (int64, or a ClassLabel), crowd flags, areas, and with
    `masks` each object's mask as compressed RLE counts."""
    fields = {"bbox": datasets.Sequence(datasets.Value("float32"), length=4), "category": category or datasets.Value("int64"),
              "iscrowd": datasets.Value("int64"), "area": datasets.Value("float32")}
    if masks:
        fields["segmentation"] = datasets.Value("string")
    return datasets.Sequence(fields)


def has_masks(dataset: datasets.Dataset) -> bool:
    """Whether a detection split's objects carry instance masks."""
    inner = getattr(dataset.features["objects"], "feature", dataset.features["objects"])
    return isinstance(inner, dict) and "segmentation" in inner


def object_columns(cell: dict | list) -> dict[str, list]:
    """An objects cell in column form ({bbox: [...], category: [...], ...}); a list of per-object dicts (a
    list-of-structs column) is turned round. Fields other than OBJECT_FIELDS are dropped."""
    if isinstance(cell, list):
        return {key: [o[key] for o in cell] for key in OBJECT_FIELDS if all(key in o for o in cell)}
    return {key: list(cell[key]) for key in OBJECT_FIELDS if key in cell}


def decode_objects(cell: dict | list) -> dict:
    """{bbox: [[x, y, w, h]], category: [c], iscrowd?, area?, segmentation?} -> {boxes (M, 4) x0 y0 x1 y1
    float32, labels (M,) int64 (category + 1), iscrowd (M,) int64, area (M,) float32 (the given area, else
    the box's)}, and `segmentation` (the M counts strings, still encoded: their size is the image's, which
    the joint transform knows). A cell may also be a list of per-object dicts (a list-of-structs column)."""
    cell = object_columns(cell)
    xywh = torch.tensor(cell.get("bbox") or [], dtype=torch.float32).reshape(-1, 4)
    boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
    labels = torch.tensor(cell.get("category") or [], dtype=torch.int64) + 1
    crowd = torch.tensor(cell.get("iscrowd") or [0] * len(labels), dtype=torch.int64)
    area = torch.tensor(cell["area"], dtype=torch.float32) if cell.get("area") else xywh[:, 2] * xywh[:, 3]
    target = {"boxes": boxes, "labels": labels, "iscrowd": crowd, "area": area}
    if cell.get("segmentation") is not None:
        target["segmentation"] = [counts or "" for counts in cell["segmentation"]]
    return target
