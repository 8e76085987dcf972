"""Knowledge distillation (DeiT, Touvron et al., 2021): a student learns from labels and a frozen teacher.

    loss = (1 - alpha) * CE(student, labels) + alpha * distillation term

The distillation term by `mode` and `type`:
- token (DeiT): the student's distillation token has its own head (`head_dist`); the class head learns
  from the labels, the distillation head from the teacher. At inference the two heads are averaged, and
  the weights are timm's `deit_*_distilled` state dict.
- logit: the same logits learn from both.
- hard: CE against the teacher's argmax (DeiT's best); soft: tau^2 KL(teacher/tau || student/tau), summed
  over the classes and averaged over the batch (Hinton et al.; the DeiT paper's equation, and timm's).
- feature: a learned linear projection of the student's pooled features regresses the teacher's (MSE);
  timm's feature distillation. The projection is the objective's own state, not the model's.
Evaluation and the best checkpoint are the classifier's (top-1 of the student).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitcli.errors import VitError
from vitcli.objectives.base import Inputs
from vitcli.objectives.supervised import Classification
from vitcli.models.timm_classifier import PREFIX
from vitcli.objectives.teacher import Teacher, load_teacher


def distillation_term(student: torch.Tensor, teacher: torch.Tensor, kind: str, tau: float) -> torch.Tensor:
    """DeiT's distillation loss of student logits against teacher logits: hard (CE on the argmax) or soft."""
    if kind == "hard":
        return F.cross_entropy(student, teacher.argmax(dim=1))
    return F.kl_div(F.log_softmax(student / tau, dim=1), F.log_softmax(teacher / tau, dim=1),
                    reduction="batchmean", log_target=True) * tau * tau


class Distillation(Classification):
    name = "distill"

    @classmethod
    def check_recipe(cls, recipe) -> None:
        teacher = recipe.objective.distill.teacher
        if teacher and not teacher.startswith(PREFIX) and ":" not in teacher and not Path(teacher).expanduser().exists():
            raise VitError(f"objective.distill.teacher {teacher} does not exist. Train a teacher first (e.g. vit pretrain "
                           "recipes/cnn_teacher_digits.yaml --out runs/cnn_teacher_digits) or pass a checkpoint or timm:ARCH.")

    @classmethod
    def from_recipe(cls, cfg, model: nn.Module, given: Inputs) -> Distillation:
        kd = cfg.distill
        if kd.mode == "token" and getattr(model, "dist_token", None) is None:
            raise VitError("objective.distill.mode token trains DeiT's distillation token, which this model has not: set "
                           "model.distilled: true (a vit_* model) or take a deit_*_distilled model, or use mode logit.")
        teacher = load_teacher(kd, given.num_classes, given.class_names)
        criterion = given.criterion if given.criterion is not None else nn.CrossEntropyLoss()
        return cls(model, teacher, criterion, given.num_classes, mode=kd.mode, kind=kd.type, alpha=kd.alpha, tau=kd.tau,
                   mean=given.mean, std=given.std)

    def __init__(self, model: nn.Module, teacher: Teacher, criterion: nn.Module, num_classes: int, *, mode: str = "token",
                 kind: str = "hard", alpha: float = 0.5, tau: float = 1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)):
        super().__init__(model, criterion, num_classes)
        self.teacher = teacher  # a Teacher, not a submodule: never optimized, saved, wrapped by DDP or sharded by FSDP
        self.mode, self.kind, self.alpha, self.tau = mode, kind, alpha, tau
        self.mean, self.std = tuple(mean), tuple(std)  # the student's normalisation, which the teacher's input undoes
        if mode == "feature":
            self.project = nn.Linear(model.num_features, teacher.num_features)
        if mode == "token":
            model.distilled_training = True  # in training the model returns (class logits, distillation logits)

    def start_note(self) -> str:
        t = self.teacher
        how = "a learned projection onto its features" if self.mode == "feature" else \
            f"{self.kind} {'distillation token' if self.mode == 'token' else 'logits'}" + (f", tau {self.tau:g}" if self.kind == "soft" else "")
        fed = f", fed {t.img_size[0]}x{t.img_size[1]} images" if t.img_size else ""
        return f"Distilling from {t.source} ({t.num_classes} classes{fed}): {how}, alpha {self.alpha:g}."

    def forward(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        images, targets = batch
        teacher_logits, teacher_features = self.teacher.outputs(images, self.mean, self.std)
        if self.mode == "feature":
            tokens = self.model.forward_features(images)  # the model's own methods: FSDP gathers their shards
            features = self.model.forward_head(tokens, pre_logits=True)
            logits = self.model.forward_head(tokens)
            term = F.mse_loss(self.project(features).float(), teacher_features.float())
        else:
            out = self.model(images)
            logits, student = out if isinstance(out, tuple) else (out, out)
            term = distillation_term(student.float(), teacher_logits.float(), self.kind, self.tau)
        task = self.criterion(logits, targets)
        return (1 - self.alpha) * task + self.alpha * term, {"task_loss": task.detach(), "distill_loss": term.detach()}
