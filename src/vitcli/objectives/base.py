"""What the engine asks of every training objective, with the defaults most of them keep.

An objective is a module around the model: `loss, metrics = objective(batch)` in training; `evaluate`
scores the model (or its EMA) on evaluation batches, `eval_metrics` names what each evaluation logs and
`score` turns it into the one number (higher is better) that picks the `best` checkpoint. Its own
trainable parts (a decoder, a [mask] token, a projection), if any, are everything outside `model.`:
`optimized()` then includes them, and `own_state()` is what a checkpoint keeps of them to resume.

The registry (objectives.OBJECTIVES) maps a recipe's `objective.name` to the class; `from_recipe` builds it
from the recipe's objective section, `check_recipe` refuses settings it cannot honour before a run starts.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from vitcli.data.views import ViewSpec
from vitcli.objectives.fewshot import FewshotSet
from vitcli.objectives.knn import NeighbourSet
from vitcli.recipe import ObjectiveCfg, Recipe


@dataclass(frozen=True)
class Inputs:
    """What a builder may use besides the recipe's objective section and the model."""

    criterion: nn.Module | None = None  # the labels' loss (label smoothing, Mixup/CutMix soft targets)
    num_classes: int = 0
    class_names: list[str] | None = None
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    fewshot: FewshotSet | None = None
    knn: NeighbourSet | None = None  # the training split's images for k-NN evaluations (objective.knn)
    steps_per_epoch: int = 1  # the run's plan, for objectives with schedules of their own (DINO's)
    total_steps: int = 1
    window: int | None = None  # segmentation: the sliding window, the training crop (None: the encoder's resolution)
    window_stride: int | None = None  # segmentation: sliding windows' stride (None: the window, i.e. no overlap)
    eval_scales: tuple[float, ...] = (1.0,)  # segmentation: several scales average their probabilities
    eval_flip: bool = False


class Objective(nn.Module, ABC):
    name: str = ""
    reads_labels: bool = True  # False: the data may have no labels (they only score few-shot evaluations)
    best_metric: str = "top1"
    eval_metrics: tuple[str, ...] = ()
    default_fewshot: tuple[int, ...] = ()  # few-shot evaluations when objective.fewshot is unset

    @classmethod
    @abstractmethod
    def from_recipe(cls, cfg: ObjectiveCfg, model: nn.Module, given: Inputs) -> Objective:
        """The objective around `model` from the recipe's objective section; VitError when the model cannot serve it."""

    @classmethod
    def check_recipe(cls, recipe: Recipe) -> None:
        """VitError for recipe settings this objective cannot honour (called before a run starts)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @abstractmethod
    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of one (micro-)batch and any per-step metrics to log."""

    @abstractmethod
    def evaluate(self, model: nn.Module, batches: Iterable, device: torch.device,
                 amp_dtype: torch.dtype | None) -> dict[str, Any]:
        """What one evaluation of `model` (the trained weights, or their EMA) reports."""

    @classmethod
    def views(cls, recipe: Recipe, img_size: tuple[int, int]) -> ViewSpec | None:
        """The training views of each image when there are several (data/views.py); None: one, the recipe's crop."""
        return None

    def published(self) -> nn.Module | None:
        """The module evaluations score and model.safetensors holds, when it is not the trained model (or its
        EMA): DINO's teacher backbone. The trained model's weights then go to state.pt."""
        return None

    def begin_step(self, number: int) -> None:
        """Update `number` (1-based) is about to run: objectives with their own schedules set their clock here."""

    def before_update(self) -> None:
        """The step's gradients are in (unscaled, not yet clipped); the optimizer has not run."""

    def after_update(self) -> None:
        """The optimizer has updated the parameters (a skipped, non-finite step does not get here)."""

    def start_note(self) -> str | None:
        """What the start of a run says about this objective, if anything beyond the model and data."""
        return None

    def score(self, metrics: dict[str, Any]) -> float:
        """Higher is better; picks the `best` checkpoint."""
        return metrics[self.best_metric]

    def describe(self, metrics: dict[str, Any]) -> str:
        """An evaluation in one console line."""
        return "  ".join(f"{k} {metrics[k]:.4f}" for k in self.eval_metrics if isinstance(metrics.get(k), float))

    def optimized(self) -> nn.Module:
        """The module whose parameters the optimizer updates: the model, plus the objective's own parts."""
        return self if self.own_state() else self.model

    def own_state(self) -> dict[str, torch.Tensor]:
        """The objective's own weights and buffers: training state, not part of the model a user fine-tunes."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("model.")}

    def load_own_state(self, state: dict[str, torch.Tensor]) -> None:
        missing, unexpected = self.load_state_dict(state, strict=False)
        own_missing = [k for k in missing if not k.startswith("model.")]
        if own_missing or unexpected:
            raise RuntimeError(f"{self.name} state does not fit: missing {own_missing}, unexpected {unexpected}")
