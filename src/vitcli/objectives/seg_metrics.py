"""Semantic segmentation metrics from one confusion matrix summed over the whole evaluation set (mmseg's
and Segmenter's way: intersections and unions add up over images before dividing, not per-image means).

- IoU of class c: TP / (TP + FP + FN); mIoU: the mean over classes whose union is not empty.
- Pixel accuracy: correct pixels / labelled pixels.
- Mean accuracy: the mean over classes present in the ground truth of TP / (their pixels).
Pixels labelled `ignore_index` (255: VOC's borders, ADE20K's "other" after reduce_zero_label) count nowhere.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = 255


class ConfusionMatrix:
    """K x K pixel counts, rows: ground truth, columns: prediction."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, predicted: torch.Tensor, target: torch.Tensor) -> None:
        """predicted, target: class ids of the same shape (any batch of pixels)."""
        keep = (target != self.ignore_index) & (target >= 0) & (target < self.num_classes)
        k = self.num_classes
        index = target[keep].to(torch.int64) * k + predicted[keep].to(torch.int64)
        self.matrix += torch.bincount(index.cpu(), minlength=k * k).reshape(k, k)

    def merge(self, other: torch.Tensor) -> None:
        """Add another rank's matrix (already all-reduced, or gathered)."""
        self.matrix += other.to(self.matrix)

    def results(self) -> dict:
        m = self.matrix.double()
        tp, gt, pred = m.diag(), m.sum(1), m.sum(0)
        union = gt + pred - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        recall = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
        labelled = m.sum()
        return {
            "miou": _nanmean(iou),
            "pixel_accuracy": float(tp.sum() / labelled) if labelled > 0 else float("nan"),
            "mean_accuracy": _nanmean(recall),
            "per_class_iou": [None if v != v else float(v) for v in iou.tolist()],
            "num_pixels": int(labelled),
        }


def _nanmean(values: torch.Tensor) -> float:
    present = values[~values.isnan()]
    return float(present.mean()) if len(present) else float("nan")
