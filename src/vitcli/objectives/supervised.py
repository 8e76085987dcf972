"""The paper's pretraining and fine-tuning objective: classify each image from its class token.

    objective = Classification(model, criterion, num_classes)
    loss, metrics = objective((images, targets))     # targets: class ids, or Mixup/CutMix soft targets
    scores = objective.evaluate(model, eval_batches, device, amp_dtype)   # top-1, top-5, loss, ECE, ...
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vitcli.objectives.base import Inputs, Objective
from vitcli.objectives.evaluate import evaluate


class Classification(Objective):
    """Cross-entropy (with label smoothing, or soft targets under Mixup/CutMix) of the model's logits."""

    name = "supervised"
    best_metric = "top1"  # higher is better; picks the `best` checkpoint
    eval_metrics = ("top1", "top5", "balanced_accuracy", "loss", "ece", "num_images", "images_per_second")  # what each evaluation logs

    @classmethod
    def from_recipe(cls, cfg, model: nn.Module, given: Inputs) -> Classification:
        return cls(model, given.criterion if given.criterion is not None else nn.CrossEntropyLoss(), given.num_classes)

    def __init__(self, model: nn.Module, criterion: nn.Module, num_classes: int):
        super().__init__(model)
        self.criterion = criterion
        self.num_classes = num_classes

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, targets = batch
        return self.criterion(self.model(images), targets), {}

    def evaluate(self, model: nn.Module, batches: Iterable, device: torch.device,
                 amp_dtype: torch.dtype | None) -> dict[str, Any]:
        """Scores of `model` (the trained weights, or their EMA) on the evaluation batches."""
        return evaluate(model, batches, self.num_classes, device, amp_dtype)

    def describe(self, metrics: dict[str, Any]) -> str:
        return f"top1 {metrics['top1']:.4f}  top5 {metrics['top5']:.4f}  loss {metrics['loss']:.4f}"
