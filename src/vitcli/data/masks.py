"""Segmentation sets: each image with a mask of class ids, one split as a `MaskSet`.

Every source ends as a `datasets.Dataset` with two encoded Image() columns, `image` and `mask`, as a
classification source ends with image and label, so loading, subsets and caching take one path.
Masks are palette or grey PNGs whose pixel values are class ids; 255 is ignored (VOC's object borders).
With `reduce_zero_label` (ADE20K) 0 means "unlabelled": it becomes 255 and every class moves down by one.

Sources (data/seg_layouts.py reads the folders):
- `digits-seg`: built in (builtin.py);
- a named Hub set (`ade20k`: scene_parse_150's image + annotation), or its save_to_disk copy;
- folders: the generic `img_dir/{train,val}` + `ann_dir/{train,val}` (matching stems), ADE20K's
  `ADEChallengeData2016`, Pascal VOC 2012's `JPEGImages` + `SegmentationClass` + `ImageSets/Segmentation`;
- class names from `classes.txt` (one per line) or `classes.json` (a list) beside the data, else the
  set's own (VOC's 21, ADE20K's objectInfo150), else numbers up to the largest id in the masks.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from typing import Callable

import datasets
import numpy as np
from PIL import Image

from vitcli.errors import VitError

IGNORE_INDEX = 255
OUTSIDE = -1  # a batch's padding around a smaller mask: not part of its image (ignored like 255)


@dataclass
class MaskSet:
    """One split of a segmentation set: `dataset` has columns image and mask (both encoded Image())."""

    dataset: datasets.Dataset
    num_classes: int
    class_names: list[str]
    name: str
    split: str
    reduce_zero_label: bool = False

    multilabel = False  # one class per pixel
    target_column = "mask"  # what the loader reads beside the image

    def __len__(self) -> int:
        return len(self.dataset)

    def target_decoder(self) -> Callable[[dict], np.ndarray]:
        """What turns a mask cell into class ids (picklable: loader workers call it)."""
        return functools.partial(decode_mask, reduce_zero_label=self.reduce_zero_label)


def decode_mask(cell: dict, reduce_zero_label: bool = False, where: str = "") -> np.ndarray:
    """An encoded mask cell -> (H, W) uint8 class ids (255: ignored)."""
    data = cell.get("bytes")
    with Image.open(io.BytesIO(data) if data is not None else cell["path"]) as img:
        if img.mode not in ("P", "L", "I", "I;16"):
            raise VitError(f"The mask {where or cell.get('path') or ''} is a {img.mode} image; masks must be palette or grey "
                           "PNGs whose pixel values are class ids (convert colour-coded masks to ids first).")
        mask = np.asarray(img)
    if mask.max(initial=0) > IGNORE_INDEX:
        raise VitError(f"The mask {where or cell.get('path') or ''} holds class ids up to {int(mask.max())}; vitcli reads "
                       f"ids 0-254 (255: ignored).")
    mask = mask.astype(np.uint8)
    if reduce_zero_label:
        mask = np.where(mask == 0, IGNORE_INDEX, mask - 1).astype(np.uint8)
        mask[mask == IGNORE_INDEX - 1] = IGNORE_INDEX  # 255 stays ignored
    return mask


def largest_class(ds: datasets.Dataset, reduce_zero_label: bool) -> int:
    """The largest class id in a split's masks (ignoring 255): how many classes a set without names has."""
    cells = ds.cast_column("mask", datasets.Image(decode=False))["mask"]
    top = -1
    for cell in cells:
        ids = np.unique(decode_mask(cell, reduce_zero_label))
        ids = ids[ids != IGNORE_INDEX]
        if len(ids):
            top = max(top, int(ids.max()))
    return top



def palette() -> list[int]:
    """Pascal VOC's colour map (class id bits interleaved over R, G, B), 256 RGB entries as a flat list for
    PIL's putpalette: class 0 black, 255 (ignored) white."""
    colours = []
    for c in range(256):
        r = g = b = 0
        label = c
        for shift in range(7, -1, -1):
            r |= (label & 1) << shift
            g |= ((label >> 1) & 1) << shift
            b |= ((label >> 2) & 1) << shift
            label >>= 3
        colours += [r, g, b]
    colours[IGNORE_INDEX * 3:] = [255, 255, 255]
    return colours
