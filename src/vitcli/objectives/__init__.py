"""Training objectives: modules that turn a batch into `loss, metrics = objective(batch)`.

An objective holds the model (and any trainable parts of its own) so the engine wraps it once with
DDP/FSDP, and says what its evaluations report (`evaluate`, `eval_metrics`, `score`). The engine knows
nothing else about it. `supervised` (Classification) is the paper's; `multilabel` its sigmoid-per-class
form (chosen for multi-label data); `segmentation` a Segmenter's per-pixel one (task: segmentation);
`detection` a torchvision detector's own losses (task: detection);
`distill` adds a frozen teacher (DeiT); `mpp` (the paper's masked patch prediction, §4.6), `mae`
(masked autoencoder) and `dino` (self-distillation from a moving-average teacher) need no labels.

A new objective is one module (a subclass of Objective with its `from_recipe`) and one line in OBJECTIVES,
plus its settings' section in the recipe (objective.<name>.*) if it has any.
"""

from __future__ import annotations

from torch import nn

from vitcli.errors import VitError, did_you_mean
from vitcli.objectives.base import Inputs, Objective
from vitcli.objectives.detection import Detection
from vitcli.objectives.dino import Dino
from vitcli.objectives.distill import Distillation
from vitcli.objectives.evaluate import ECE_BINS, EvalAccumulator, evaluate
from vitcli.objectives.fewshot import FewshotSet
from vitcli.objectives.mae import MaskedAutoencoder
from vitcli.objectives.mpp import MaskedPatchPrediction
from vitcli.objectives.multilabel import MultiLabel
from vitcli.objectives.segmentation import SemanticSegmentation
from vitcli.objectives.selfsup import SelfSupervised
from vitcli.objectives.supervised import Classification
from vitcli.recipe import ObjectiveCfg

__all__ = ["ECE_BINS", "OBJECTIVES", "Classification", "Detection", "Dino", "Distillation", "EvalAccumulator", "FewshotSet", "Inputs", "MaskedAutoencoder",
           "MaskedPatchPrediction", "MultiLabel", "Objective", "SelfSupervised", "SemanticSegmentation", "build_objective", "evaluate", "objective_class"]

# The one registry of objectives, shared by `vit pretrain` (engine.setup) and `vit bench --objective`.
OBJECTIVES: dict[str, type[Objective]] = {
    "supervised": Classification,
    "distill": Distillation,
    "multilabel": MultiLabel,
    "mpp": MaskedPatchPrediction,
    "mae": MaskedAutoencoder,
    "dino": Dino,
    "segmentation": SemanticSegmentation,
    "detection": Detection,
}


def objective_class(name: str) -> type[Objective]:
    """The registered objective of that name; VitError naming the known ones otherwise."""
    if name not in OBJECTIVES:
        raise VitError(f"objective {name!r} is not one of {', '.join(OBJECTIVES)}.{did_you_mean(name, OBJECTIVES)}")
    return OBJECTIVES[name]


def build_objective(cfg: ObjectiveCfg, model: nn.Module, given: Inputs = Inputs()) -> Objective:
    """The recipe's objective around `model`; VitError when the model cannot serve it."""
    return objective_class(cfg.name).from_recipe(cfg, model, given)
