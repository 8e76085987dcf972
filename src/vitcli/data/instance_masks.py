"""Instance masks of detection objects (Mask R-CNN's targets, COCO mask AP), kept as COCO's compressed RLE.

An objects cell holds each object's mask as the `counts` string of pycocotools' compressed RLE over the
image's own height and width (`segmentation`; the size is the image's, so it is not stored again). That is
how COCO itself stores crowd regions, a few dozen bytes for a digit, and what mask AP is computed on. A COCO
file's polygons and uncompressed RLE are turned into it when the file is read (`rle_counts`). An object of
a masked set that has no mask ("") takes its box as its mask.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from pycocotools import mask as coco_mask


def rle_counts(segmentation, height: int, width: int) -> str:
    """A COCO annotation's `segmentation` (polygons, uncompressed or compressed RLE) -> compressed counts."""
    if isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), str):
        return segmentation["counts"]
    if isinstance(segmentation, dict):
        rle = coco_mask.frPyObjects(segmentation, height, width)
    else:  # polygons: one RLE each, merged into one mask
        rle = coco_mask.merge(coco_mask.frPyObjects(segmentation, height, width))
    return rle["counts"].decode("ascii")


def encode_masks(masks: np.ndarray | torch.Tensor) -> list[dict]:
    """(M, H, W) binary masks -> COCO RLE dicts {size: [H, W], counts: str}, as COCO results hold them."""
    array = np.asfortranarray(np.asarray(masks, dtype=np.uint8).reshape(-1, *masks.shape[-2:]).transpose(1, 2, 0))
    encoded = coco_mask.encode(array)
    return [{"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")} for rle in encoded]


def decode_masks(counts: Sequence[str], boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Objects' compressed counts (over a height x width image) -> uint8 masks (M, H, W); an empty count
    string gives the object's box (x0 y0 x1 y1, `boxes`) filled."""
    masks = torch.zeros((len(counts), height, width), dtype=torch.uint8)
    for i, counts_i in enumerate(counts):
        if counts_i:
            with warnings.catch_warnings():  # pycocotools' RLE objects predate numpy 2's __array__(copy=...)
                warnings.simplefilter("ignore", DeprecationWarning)
                masks[i] = torch.from_numpy(coco_mask.decode({"size": [height, width], "counts": counts_i.encode("ascii")}))
        else:
            x0, y0, x1, y1 = (int(round(float(v))) for v in boxes[i])
            masks[i, max(0, y0):y1, max(0, x0):x1] = 1
    return masks
