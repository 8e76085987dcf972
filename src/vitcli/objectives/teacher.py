"""The frozen teacher of distillation: read once, checked against the student, fed the student's batch.

    teacher = load_teacher(cfg.distill, num_classes=10, class_names=names)
    logits = teacher.logits(images)        # images as the student's loader normalised them

A teacher is any checkpoint vitcli reads (a run of a ViT or of a `timm:ARCH` classifier, a file), or
`timm:ARCH` itself: its published weights from the Hugging Face cache, or a local state dict
(`objective.distill.teacher_weights`). It runs in eval mode under no_grad, is never optimized, saved or
sharded: every process holds a whole copy. Its input is the student's augmented batch, re-normalised to
the teacher's mean/std and resized to its resolution when they differ (as timm's distillation does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitcli.errors import VitError
from vitcli.io.meta import Preprocessing
from vitcli.models.adapt import model_from_checkpoint
from vitcli.models.formats.timm import load_name
from vitcli.models.readers import TORCH_SUFFIXES, read_torch
from vitcli.models.timm_classifier import PREFIX, timm_classifier_config, create_timm_classifier, load_timm_weights
from vitcli.recipe import DistillCfg


@dataclass
class Teacher:
    model: nn.Module  # eval mode, no gradients
    source: str
    img_size: tuple[int, int] | None  # None: any (the student's)
    preprocess: Preprocessing | None  # None: the student's
    class_names: list[str] | None = None
    _affine: dict = field(default_factory=dict, repr=False)  # (device, dtype, mean, std) -> (scale, shift)

    @property
    def num_classes(self) -> int:
        return int(self.model.num_classes)

    @property
    def num_features(self) -> int:
        return int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)

    def inputs(self, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
        """The student's batch, normalised by (mean, std), as the teacher was trained to see it."""
        pre = self.preprocess
        if pre is not None and (tuple(pre.mean), tuple(pre.std)) != (tuple(mean), tuple(std)):
            key = (images.device, images.dtype, tuple(mean), tuple(std))
            if key not in self._affine:  # built once per device: no new tensors (or syncs) on every step
                m, s, tm, ts = (images.new_tensor(v).view(1, -1, 1, 1) for v in (mean, std, pre.mean, pre.std))
                self._affine[key] = (s / ts, (m - tm) / ts)
            scale, shift = self._affine[key]
            images = images * scale + shift
        if self.img_size is not None and tuple(images.shape[-2:]) != self.img_size:
            images = F.interpolate(images, size=self.img_size, mode="bilinear", align_corners=False, antialias=False)
        return images

    @torch.no_grad()
    def outputs(self, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled pre-logit features) of the teacher on the student's batch."""
        model = self.model
        if next(model.parameters()).device != images.device:
            model.to(images.device)
        features = model.forward_head(model.forward_features(self.inputs(images, mean, std)), pre_logits=True)
        return model.get_classifier()(features), features


def load_teacher(cfg: DistillCfg, num_classes: int, class_names: list[str] | None) -> Teacher:
    """The recipe's teacher, frozen; VitError when it cannot be read or does not predict the student's classes."""
    spec = cfg.teacher
    if spec is None:
        raise VitError("objective distill needs objective.distill.teacher: a run directory, a checkpoint or timm:ARCH.")
    if cfg.teacher_weights is not None and not spec.startswith(PREFIX):
        raise VitError(f"objective.distill.teacher_weights is for a timm:ARCH teacher; {spec} carries its own weights.")
    try:
        teacher = _timm_teacher(spec, cfg.teacher_weights, num_classes) if spec.startswith(PREFIX) else _checkpoint_teacher(spec)
    except VitError as e:
        raise VitError(f"objective.distill.teacher {spec}: {e}") from e
    if teacher.num_classes != num_classes:
        raise VitError(f"the teacher {spec} predicts {teacher.num_classes} classes and the student {num_classes}: "
                       "distillation needs a teacher trained on the student's classes.")
    if teacher.class_names and class_names and list(teacher.class_names) != list(class_names):
        raise VitError(f"the teacher {spec} was trained on the classes {teacher.class_names[:5]}..., the student trains "
                       f"on {list(class_names)[:5]}...: the same classes in the same order are needed.")
    teacher.model.eval().requires_grad_(False)
    return teacher


def _checkpoint_teacher(spec: str) -> Teacher:
    model, ck = model_from_checkpoint(spec)
    size = ck.meta.img_size
    return Teacher(model, spec, tuple(size) if size else None, ck.meta.preprocess, ck.meta.class_names)


def _timm_teacher(spec: str, weights: str | None, num_classes: int) -> Teacher:
    name = spec[len(PREFIX):].strip()
    if weights is None:
        model, source = load_name(name)  # published weights from the Hugging Face cache (offline-safe)
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise VitError(f"objective.distill.teacher_weights {path} does not exist; pass a .safetensors or .pth state dict.")
        model = create_timm_classifier(timm_classifier_config(spec, num_classes=num_classes))
        load_timm_weights(model, _state_dict(path), path)
        source = str(path)
    # timm's normalisation for the architecture; its published weights' resolution (a local state dict was
    # trained at a size only its owner knows: the student's is used)
    pcfg = getattr(model, "pretrained_cfg", {}) or {}
    size = pcfg.get("input_size") if weights is None else None
    preprocess = Preprocessing(mean=tuple(pcfg["mean"]), std=tuple(pcfg["std"])) if pcfg.get("mean") else None
    return Teacher(model, f"{spec} ({source})", tuple(size[1:]) if size else None, preprocess)


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.name.endswith(".safetensors"):
        from vitcli.io.checkpoint import read_weights

        return read_weights(path)[0]
    if path.name.endswith(TORCH_SUFFIXES):
        return read_torch(path, [])[0]
    raise VitError(f"objective.distill.teacher_weights {path.name}: use a .safetensors or .pth state dict.")
