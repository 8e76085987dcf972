"""Multi-label classification: a sigmoid per class, binary cross-entropy, and the ranking metrics it is judged by.

    objective = MultiLabel(model, criterion, num_classes)      # criterion: BCE on multi-hot (or mixed) targets
    scores = objective.evaluate(model, batches, device, amp_dtype)   # map, per_class_ap, f1, threshold, loss

- mAP: the mean over the classes with a positive image of their average precision, sum_n (R_n - R_(n-1)) P_n
  over the distinct score thresholds (the definition of sklearn's average_precision_score).
- F1: micro F1 of (image, class) decisions score >= threshold. The threshold is chosen on held-out data:
  each half of the evaluation split (even / odd images) picks the threshold (0.05, 0.10 ... 0.95) that
  maximises F1 on it and is scored on the other half; `f1` is the mean of the two scores, `threshold` the
  choice on the whole split, which the checkpoint keeps for `vit predict`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitcli.objectives.base import Inputs
from vitcli.objectives.evaluate import gather_arrays
from vitcli.objectives.supervised import Classification

THRESHOLDS = np.round(np.arange(0.05, 0.951, 0.05), 2)


def average_precision(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Per class (columns), nan for a class without a positive image."""
    out = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        positive = targets[:, c] > 0.5
        if not positive.any():
            continue
        order = np.argsort(-scores[:, c], kind="mergesort")
        ranked, hits = scores[order, c], positive[order]
        last_of_tie = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # ties count as one threshold
        tp = np.cumsum(hits)[last_of_tie]
        precision, recall = tp / (last_of_tie + 1), tp / tp[-1]
        out[c] = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    return out


def f1_at(scores: np.ndarray, targets: np.ndarray, threshold: float) -> float:
    """Micro F1 of the decisions scores >= threshold."""
    predicted, actual = scores >= threshold, targets > 0.5
    tp = np.sum(predicted & actual)
    denominator = predicted.sum() + actual.sum()
    return float(2 * tp / denominator) if denominator else 1.0


def best_threshold(scores: np.ndarray, targets: np.ndarray) -> float:
    return float(THRESHOLDS[int(np.argmax([f1_at(scores, targets, t) for t in THRESHOLDS]))])


def ranking_metrics(scores: np.ndarray, targets: np.ndarray, threshold: float | None = None) -> dict[str, Any]:
    """mAP, per-class AP, F1 and its threshold (see the module docstring); `threshold` given: F1 at it."""
    ap = average_precision(scores, targets)
    if threshold is None:
        halves = [np.arange(len(scores)) % 2 == k for k in (0, 1)]
        f1 = float(np.mean([f1_at(scores[~h], targets[~h], best_threshold(scores[h], targets[h])) for h in halves]))
        threshold = best_threshold(scores, targets)
    else:
        f1 = f1_at(scores, targets, threshold)
    return {"map": float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan"),
            "per_class_ap": [None if np.isnan(a) else float(a) for a in ap], "f1": f1, "threshold": threshold}


@torch.no_grad()
def evaluate_multilabel(model: nn.Module, batches: Iterable, device: torch.device, amp_dtype: torch.dtype | None = None,
                        threshold: float | None = None, on_batch=None) -> dict[str, Any]:
    """Ranking metrics, mean BCE and images/s of `model` over batches of (images, multi-hot targets)."""
    was = model.training
    model.eval()
    amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
    scores, targets, loss = [], [], 0.0
    start = time.perf_counter()
    for images, y in batches:
        with amp:
            logits = model(images.to(device, non_blocking=True))
        if len(y) == 0:
            continue
        y = y.to(device).float()
        loss += float(F.binary_cross_entropy_with_logits(logits.float(), y, reduction="sum")) / y.shape[1]
        scores.append(logits.float().sigmoid().cpu().numpy())
        targets.append(y.cpu().numpy())
        if on_batch is not None:
            on_batch(logits, y)
    model.train(was)
    seconds = time.perf_counter() - start
    width = targets[0].shape[1] if targets else 0
    all_scores, all_targets, losses = gather_arrays(np.concatenate(scores) if scores else np.zeros((0, width), np.float32),
                                                    np.concatenate(targets) if targets else np.zeros((0, width), np.float32),
                                                    np.array([loss]))
    n = len(all_scores)
    out = ranking_metrics(all_scores, all_targets, threshold) if n else {"map": float("nan"), "per_class_ap": [],
                                                                         "f1": float("nan"), "threshold": threshold}
    return {**out, "loss": float(losses.sum()) / max(n, 1), "num_images": n, "seconds": seconds,
            "images_per_second": n / seconds if seconds else 0.0}


class MultiLabel(Classification):
    """Binary cross-entropy per class on multi-hot targets (Mixup/CutMix mix them); mAP picks the best checkpoint."""

    name = "multilabel"
    best_metric = "map"
    eval_metrics = ("map", "f1", "threshold", "loss", "num_images", "images_per_second")

    @classmethod
    def from_recipe(cls, cfg, model: nn.Module, given: Inputs) -> MultiLabel:
        from timm.loss import BinaryCrossEntropy

        return cls(model, given.criterion if given.criterion is not None else BinaryCrossEntropy(), given.num_classes)

    def evaluate(self, model: nn.Module, batches: Iterable, device: torch.device,
                 amp_dtype: torch.dtype | None) -> dict[str, Any]:
        return evaluate_multilabel(model, batches, device, amp_dtype)

    def describe(self, metrics: dict[str, Any]) -> str:
        return f"mAP {metrics['map']:.4f}  F1 {metrics['f1']:.4f} at {metrics['threshold']:.2f}  loss {metrics['loss']:.4f}"
