"""Segmentation inference over whole images: sliding windows at one scale, optionally several scales
and flips (Segmenter's and mmseg's evaluation).

Sliding windows: windows of `window` pixels every `stride` pixels, the last one flush with the image
edge; each pixel's scores are the mean over the windows covering it. An image no larger than the window
is one window: the model itself. Multi-scale: the image resized by each scale (bilinear), slid over,
its class probabilities resized back and averaged, with the horizontal flip of each when asked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

MULTI_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)  # Segmenter's / mmseg's multi-scale test


def _starts(size: int, window: int, stride: int) -> list[int]:
    if size <= window:
        return [0]
    return sorted(set(range(0, size - window, stride)) | {size - window})


def sliding_window(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, num_classes: int,
                   window: int, stride: int, chunk: int = 32) -> torch.Tensor:
    """(B, C, H, W) -> (B, K, H, W) scores averaged over the windows covering each pixel."""
    b, _, h, w = images.shape
    wh, ww = min(window, h), min(window, w)
    corners = [(t, left) for t in _starts(h, wh, stride) for left in _starts(w, ww, stride)]
    if len(corners) == 1:
        return model(images)
    crops = torch.cat([images[..., t:t + wh, left:left + ww] for t, left in corners])  # window-major
    scores = torch.cat([model(part) for part in crops.split(chunk * b)])
    total = images.new_zeros(b, num_classes, h, w)
    count = images.new_zeros(1, 1, h, w)
    for i, (t, left) in enumerate(corners):
        total[..., t:t + wh, left:left + ww] += scores[i * b:(i + 1) * b]
        count[..., t:t + wh, left:left + ww] += 1
    return total / count


def segment(model: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, num_classes: int, window: int,
            stride: int, scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """Class scores (one scale, no flip: the sliding window's) or probabilities (averaged over scales and flips)."""
    if tuple(scales) == (1.0,) and not flip:
        return sliding_window(model, images, num_classes, window, stride)
    h, w = images.shape[-2:]
    probs = images.new_zeros(images.shape[0], num_classes, h, w)
    views = 0
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        scaled = F.interpolate(images, size=size, mode="bilinear", align_corners=False) if scale != 1.0 else images
        for flipped in ((False, True) if flip else (False,)):
            x = scaled.flip(-1) if flipped else scaled
            scores = sliding_window(model, x, num_classes, window, stride)
            scores = scores.flip(-1) if flipped else scores
            probs += F.interpolate(scores, size=(h, w), mode="bilinear", align_corners=False).softmax(dim=1)
            views += 1
    return probs / views
