"""Pictures of detected or annotated objects on their image (torchvision.utils' draw_segmentation_masks and
draw_bounding_boxes): what `vit predict --draw` writes and `vit inspect` shows for a detector."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45", "#fabed4", "#469990"]


def draw_objects(pixels: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, captions: Sequence[str],
                 masks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 (C, H, W) image (grey is drawn as RGB) with each object's mask (bool (N, H, W), half
    transparent) and box (x0 y0 x1 y1) and caption, coloured by its label (1..K) -> uint8 (3, H, W)."""
    pixels = pixels.expand(3, -1, -1) if pixels.shape[0] == 1 else pixels
    colours = [COLOURS[(int(c) - 1) % len(COLOURS)] for c in labels.tolist()]
    if masks is not None and len(masks):
        pixels = draw_segmentation_masks(pixels, masks.bool(), alpha=0.5, colors=colours)
    return draw_bounding_boxes(pixels, boxes.float(), labels=list(captions), colors=colours)
