"""Any timm image classifier as a vitcli model: `model.name: timm:resnet18`.

The ViT paper measures itself against ResNets (BiT), and DeiT distils a ViT from a CNN teacher, which has
to come from somewhere offline. A `timm:ARCH` model trains, evaluates, predicts and checkpoints through
the same engine as vitcli's ViTs; its weights are timm's own state dict (so `timm.create_model(ARCH,
num_classes=N).load_state_dict(...)` reads them). It is a classifier only: what needs a ViT (position
embeddings, masked-patch objectives, attention maps) refuses it by name.

    model = create_model("timm:resnet18", num_classes=10, img_size=32)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vitcli.errors import VitError, did_you_mean

PREFIX = "timm:"
# the recipe's model fields a timm classifier takes; every other is a ViT's
SETTINGS = ("num_classes", "in_chans", "img_size", "drop_rate", "drop_path_rate")


def is_timm_classifier(name: Any) -> bool:
    return isinstance(name, str) and name.strip().lower().startswith(PREFIX)


@dataclasses.dataclass(frozen=True)
class TimmClassifierConfig:
    """What rebuilds a timm classifier: its timm architecture and the settings vitcli passes to it.
    img_size is the resolution its data is prepared at (a CNN pools globally, so any size runs)."""

    name: str  # "timm:resnet18"
    num_classes: int = 1000
    in_chans: int = 3
    img_size: tuple[int, int] = (224, 224)
    drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    hybrid = False
    arch = "timm"

    @property
    def architecture(self) -> str:
        """timm's model name, without a pretrained tag (resnet18.a1_in1k -> resnet18)."""
        return self.name[len(PREFIX):].split(".")[0]

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}

    def checkpoint_args(self) -> dict[str, Any]:
        """The create_model settings a checkpoint records to rebuild this model."""
        return {k: v for k, v in self.to_dict().items() if k in SETTINGS}


def needs_vit(what: str, name: str) -> VitError:
    """The one message for a ViT-only feature asked of a timm classifier."""
    return VitError(f"{what} needs a Vision Transformer; {name} is a timm classifier (a CNN or other network "
                    "vitcli trains as a baseline or teacher). Use a vit_* model or a ViT checkpoint.")


def timm_classifier_config(name: str, **overrides: Any) -> TimmClassifierConfig:
    """The validated config of `timm:ARCH` with recipe overrides; VitError for an unknown architecture or a
    setting only a ViT has."""
    import timm

    name = PREFIX + name.strip()[len(PREFIX):].strip()
    arch = name[len(PREFIX):].split(".")[0]
    if not arch or not timm.is_model(arch):
        raise VitError(f"unknown timm model {name!r}.{did_you_mean(arch, timm.list_models())} "
                       "`python -c \"import timm; print(timm.list_models('resnet*'))\"` lists timm's architectures.")
    for key, value in overrides.items():
        if key not in SETTINGS and value not in (None, 0, 0.0):
            raise needs_vit(f"model.{key}", name)
    args = {k: v for k, v in overrides.items() if k in SETTINGS and v is not None}
    if "img_size" in args:
        size = args["img_size"]
        args["img_size"] = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(s) for s in size)
    else:
        args["img_size"] = tuple(timm.get_pretrained_cfg(arch).input_size[1:]) if timm.get_pretrained_cfg(arch) else (224, 224)
    for key in ("num_classes", "in_chans"):
        if key in args:
            args[key] = int(args[key])
    return TimmClassifierConfig(name=name, **args)


def create_timm_classifier(cfg: TimmClassifierConfig) -> nn.Module:
    """A randomly initialised timm classifier carrying `model.config`."""
    import timm

    try:
        model = timm.create_model(cfg.architecture, pretrained=False, num_classes=cfg.num_classes,
                                  in_chans=cfg.in_chans, drop_rate=cfg.drop_rate, drop_path_rate=cfg.drop_path_rate)
    except TypeError as e:  # an architecture without stochastic depth or dropout
        raise VitError(f"{cfg.name} does not take model.drop_rate / drop_path_rate ({e}); set them to 0.") from e
    if not hasattr(model, "reset_classifier"):
        raise VitError(f"{cfg.name} is not a classifier timm can give a new head; choose an image classifier.")
    model.config = cfg
    return model


def load_timm_weights(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: Any) -> None:
    """Load a timm classifier's state dict strictly; a VitError that says which tensors do not fit."""
    try:
        model.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as e:
        first = str(e).split("\n\t", 2)[1] if "\n\t" in str(e) else str(e)
        raise VitError(f"checkpoint {source} does not fit {model.config.name} with {model.config.num_classes} classes: "
                       f"{first[:400]}. Pass the architecture and class count it was trained with.") from e
