"""What a run trains on: its splits, their transforms and what the objective needs to know of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from vitcli import data as vdata


@dataclass
class RunData:
    name: str
    train: vdata.ImageSet  # or a MaskSet / BoxSet (dense tasks), or a stream
    eval: vdata.ImageSet
    num_classes: int
    class_names: list[str]
    img_size: tuple[int, int]
    train_transform: Any
    eval_transform: Any
    mixup: Any  # timm.data.Mixup or None
    criterion: torch.nn.Module | None
    multilabel: bool = False  # several classes per image: multi-hot targets, objective multilabel
