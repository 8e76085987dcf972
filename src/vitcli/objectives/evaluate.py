"""The one evaluation loop: training's periodic evaluation, `vit eval` and its few-shot feature pass call it."""

from __future__ import annotations

import time
from collections.abc import Iterable
from contextlib import nullcontext

import numpy as np
import torch
import torch.nn.functional as F

ECE_BINS = 15


class EvalAccumulator:
    """Running sums over batches of (logits, labels); turned into metrics by `result()`.

    Sums (not means) so that shards from several processes add up with one all-reduce.
    """

    def __init__(self, num_classes: int, device: torch.device):
        self.num_classes = num_classes
        # [loss_sum, top1, top5, n]
        self.totals = torch.zeros(4, dtype=torch.float64, device=device)
        self.class_correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.class_count = torch.zeros(num_classes, dtype=torch.float64, device=device)
        # per confidence bin: [count, sum confidence, sum correct]
        self.bins = torch.zeros(3, ECE_BINS, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        logits = logits.float()
        k = min(5, logits.shape[1])
        loss = F.cross_entropy(logits, labels, reduction="sum")
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        correct1 = hit[:, 0].double()
        count = torch.tensor(float(len(labels)), dtype=torch.float64, device=logits.device)
        self.totals += torch.stack([loss.double(), correct1.sum(), hit.any(dim=1).double().sum(), count])
        self.class_correct.index_add_(0, labels, correct1)
        self.class_count.index_add_(0, labels, torch.ones_like(correct1))
        conf = logits.softmax(dim=1).max(dim=1).values.double()
        idx = (conf * ECE_BINS).long().clamp_(max=ECE_BINS - 1)
        for row, values in enumerate((torch.ones_like(conf), conf, correct1)):
            self.bins[row].index_add_(0, idx, values)

    def all_reduce(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for t in (self.totals, self.class_correct, self.class_count, self.bins):
                torch.distributed.all_reduce(t)

    def result(self) -> dict:
        loss_sum, top1, top5, n = self.totals.tolist()
        n = max(n, 1.0)
        count, conf, correct = self.bins
        ece = (count > 0).double() * (conf - correct).abs()
        per_class = torch.where(self.class_count > 0, self.class_correct / self.class_count.clamp(min=1), torch.nan)
        present = per_class[self.class_count > 0]
        return {
            "top1": top1 / n,
            # macro recall: the mean over the classes present of each one's accuracy (sklearn's balanced_accuracy_score)
            "balanced_accuracy": float(present.mean()) if len(present) else float("nan"),
            "top5": top5 / n,
            "loss": loss_sum / n,
            "ece": float(ece.sum() / n),
            "num_images": int(self.totals[3].item()),
            "per_class_accuracy": per_class.tolist(),
        }


def gather_arrays(*arrays: np.ndarray) -> tuple[np.ndarray, ...]:
    """Every process's arrays concatenated in rank order (the arrays themselves in one process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return arrays
    gathered: list = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, arrays)
    return tuple(np.concatenate([g[i] for g in gathered if len(g[i])] or [arrays[i]]) for i in range(len(arrays)))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int | None,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
    on_batch=None,
) -> dict:
    """Top-1/top-5, balanced accuracy, mean cross-entropy, ECE, per-class accuracy and images/s over `batches`.

    `on_batch(logits, labels)`, when given, sees every batch (e.g. to write predictions or keep
    features). `num_classes` None: the model's head does not score this data (features only); the
    batches run for `on_batch` alone and the scores are None. A batch with no labels is run through
    the model but not counted: under FSDP every rank must run the same number of forwards, and a rank
    whose share of the images ran out runs a dummy one.
    """
    was_training = model.training
    model.eval()
    acc = EvalAccumulator(num_classes, device) if num_classes is not None else None
    amp = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    seen = 0
    start = time.perf_counter()
    for images, labels in batches:
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        with amp:
            logits = model(images)
        if len(labels) == 0:
            continue
        if acc is not None:
            acc.update(logits, labels)
        seen += len(labels)
        if on_batch is not None:
            on_batch(logits, labels)
    if acc is not None:
        acc.all_reduce()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.train(was_training)
    if acc is not None:
        out = acc.result()
    else:
        out = {"top1": None, "top5": None, "loss": None, "ece": None, "num_images": seen, "per_class_accuracy": [],
               "balanced_accuracy": None}
    out["seconds"] = seconds
    out["images_per_second"] = out["num_images"] / seconds if seconds > 0 else 0.0
    return out
