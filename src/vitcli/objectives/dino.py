"""Self-distillation with no labels (DINO, Caron et al., 2021), with DINOv2's KoLeo and iBOT terms as settings.

The student (the model being trained, plus a projection head) sees every view of an image: two global
crops at the model's resolution and several small local ones (position embeddings resampled on the fly;
rotary ones built for the grid). The teacher, an exponential moving average of the student whose momentum
rises from 0.996 to 1 on a cosine, sees only the two global crops. The student learns to match the
teacher's centred, sharpened distribution over the head's prototypes on every pair of different views
(objectives/dino_parts.py). The head's last layer is frozen for the first epoch; the teacher's
temperature warms up from 0.04 to 0.07.

What a checkpoint holds: model.safetensors is the teacher's backbone (what DINO publishes, timm's keys),
and what evaluations score; the student, both heads and the centres live in state.pt.

DINOv2's additions (Oquab et al., 2023), each a setting (off by default):
- Sinkhorn-Knopp centring (`centering: sinkhorn_knopp`): the teacher's targets are an equipartition of
  each batch over the prototypes instead of a softmax around a running centre;
- KoLeo (weight > 0): spreads the student's class-token features of each global crop over the sphere;
- iBOT (weight > 0): a share of the global crops enter the student with random patches masked (a learned [mask]
  embedding); the student's masked patch tokens, through the same head, match the teacher's tokens of the
  unmasked crop (centred with their own centre). Masks are drawn patch by patch (iBOT's `rand`), not in blocks.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitcli.data.views import ViewSpec
from vitcli.errors import VitError
from vitcli.models.intermediates import encode
from vitcli.objectives.dino_parts import (DinoHead, cross_view_loss, koleo_loss, teacher_momentum, teacher_targets,
                                          teacher_temperature, updated_centre)
from vitcli.objectives.selfsup import SelfSupervised
from vitcli.recipe import DinoCfg


class Dino(SelfSupervised):
    name = "dino"
    default_fewshot = (10,)

    @classmethod
    def views(cls, recipe, img_size: tuple[int, int]) -> ViewSpec:
        d = recipe.objective.dino
        return ViewSpec.dino(tuple(img_size), tuple(d.global_crops_scale), local_number=d.local_crops_number,
                             local_size=d.local_crops_size, local_scale=tuple(d.local_crops_scale), jitter=d.color_jitter,
                             grayscale=d.grayscale, solarize=d.solarize, blur=d.blur)

    @classmethod
    def check_recipe(cls, recipe) -> None:
        super().check_recipe(recipe)
        if recipe.train.ema_decay is not None:
            raise VitError("objective dino keeps its own moving-average teacher (objective.dino.momentum_teacher), and "
                           "that is what its checkpoints hold; remove train.ema_decay.")
        if recipe.train.strategy == "fsdp":
            raise VitError("objective dino runs its student and teacher under DDP (train.strategy: ddp); FSDP is not "
                           "supported for it yet.")

    @classmethod
    def from_recipe(cls, cfg, model: nn.Module, given) -> Dino:
        patch = model.patch_embed.patch_size[0] if hasattr(model, "patch_embed") else None
        d = cfg.dino
        if patch is None or not hasattr(model, "encoder_input"):
            raise VitError("objective dino feeds the encoder crops of two sizes; this model cannot take other sizes. "
                           "Choose a vit_* or eva model.")
        if d.local_crops_number and d.local_crops_size % patch:
            raise VitError(f"'objective.dino.local_crops_size' ({d.local_crops_size}) must be a multiple of the "
                           f"model's patch size ({patch}).")
        if d.ibot_weight and getattr(getattr(model, "config", None), "hybrid", False):
            raise VitError("objective.dino.ibot_weight masks patch embeddings, which a hybrid's CNN stem does not "
                           "make; set it to 0 or choose a vit_* model.")
        return cls(model, d, steps_per_epoch=given.steps_per_epoch, total_steps=given.total_steps,
                   fewshot=given.fewshot, knn=given.knn)

    def __init__(self, model: nn.Module, cfg: DinoCfg, *, steps_per_epoch: int = 1, total_steps: int = 1,
                 fewshot=None, knn=None):
        super().__init__(model, fewshot, knn)
        self.cfg = cfg
        self.steps_per_epoch, self.total_steps = max(1, steps_per_epoch), max(1, total_steps)
        width = int(getattr(model, "num_features", model.embed_dim))
        self.head = DinoHead(width, cfg.out_dim, hidden_dim=cfg.hidden_dim, bottleneck_dim=cfg.bottleneck_dim,
                             layers=cfg.head_layers, norm_last_layer=cfg.norm_last_layer, batch_norm=cfg.head_batch_norm)
        if cfg.head_batch_norm and torch.distributed.is_available() and torch.distributed.is_initialized():
            self.head = nn.SyncBatchNorm.convert_sync_batchnorm(self.head)  # batch statistics over every process
        # the teacher starts as the student and is never optimized: it follows by EMA (after_update)
        self.teacher = nn.ModuleDict({"backbone": copy.deepcopy(model), "head": copy.deepcopy(self.head)})
        self.teacher.requires_grad_(False)
        self.register_buffer("centre", torch.zeros(1, cfg.out_dim))
        if cfg.ibot_weight:
            self.mask_token = nn.Parameter(torch.zeros(model.embed_dim))
            self.register_buffer("patch_centre", torch.zeros(1, cfg.out_dim))
        self.step = 0  # this update's 0-based index: the schedules' clock (set by begin_step)

    # ---- the engine's hooks ---------------------------------------------------------------------

    def published(self) -> nn.Module:
        """The teacher's backbone: what evaluations score and model.safetensors holds."""
        return self.teacher["backbone"]

    def train(self, mode: bool = True) -> Dino:
        super().train(mode)
        # DINO builds its teacher without drop path and never switches it to eval: its backbone runs here in
        # eval mode (no drop path), its head in the student's mode (a BatchNorm'd head normalises each batch)
        self.teacher["backbone"].eval()
        return self

    def begin_step(self, number: int) -> None:
        self.step = number - 1  # the schedules count iterations from 0, as DINO's tables

    def before_update(self) -> None:
        """In the first epoch(s), the last layer's gradients are dropped (DINO: it learns better so)."""
        if self.step < self.cfg.freeze_last_layer * self.steps_per_epoch:
            for p in self.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_update(self) -> None:
        """The teacher follows the student: t = m t + (1 - m) s, m on the cosine schedule."""
        m = teacher_momentum(self.step, self.total_steps, self.cfg.momentum_teacher)
        student = list(self.model.parameters()) + list(self.head.parameters())
        teacher = list(self.teacher["backbone"].parameters()) + list(self.teacher["head"].parameters())
        torch._foreach_mul_(teacher, m)
        torch._foreach_add_(teacher, [s.detach() for s in student], alpha=1 - m)

    @property
    def running_centre(self) -> torch.Tensor | None:
        """The centre subtracted from the teacher's outputs; None under Sinkhorn-Knopp centring."""
        return self.centre if self.cfg.centering == "centre" else None

    @property
    def teacher_temp(self) -> float:
        c = self.cfg
        return teacher_temperature(self.step // self.steps_per_epoch, c.warmup_teacher_temp, c.teacher_temp,
                                   c.warmup_teacher_temp_epochs)

    # ---- the loss ---------------------------------------------------------------------------------

    def forward(self, batch, encoder: nn.Module | None = None, generator: torch.Generator | None = None):
        views, _ = batch
        if isinstance(views, torch.Tensor):  # an evaluation batch: one view per image
            return self.consistency(views, encoder or self.teacher["backbone"]), {}
        c = self.cfg
        globals_ = torch.cat(views[:2])
        with torch.no_grad():
            t_tokens = encode(self.teacher["backbone"], globals_)
            t_out = self.teacher["head"](self.teacher["backbone"].forward_head(t_tokens, pre_logits=True))
        mask = self.ibot_mask(globals_, generator) if c.ibot_weight else None
        s_tokens = encode(self.model, globals_, mask=mask, mask_token=getattr(self, "mask_token", None))
        s_global = self.model.forward_head(s_tokens, pre_logits=True)
        s_features = [s_global]
        if len(views) > 2:  # the local crops, all of one size: one more pass
            s_features.append(self.model.forward_head(encode(self.model, torch.cat(views[2:])), pre_logits=True))
        s_out = self.head(torch.cat(s_features))
        temp = self.teacher_temp
        dino = cross_view_loss(s_out, t_out, self.running_centre, student_views=len(views), teacher_views=2,
                               student_temp=c.student_temp, teacher_temp=temp)
        if self.training and self.running_centre is not None:
            self.centre.copy_(updated_centre(self.centre, t_out, c.center_momentum))
        loss, metrics = dino, {"dino_loss": dino.detach(), "teacher_temp": torch.tensor(temp)}
        if c.koleo_weight:
            koleo = sum(koleo_loss(part) for part in s_global.chunk(2))
            loss = loss + c.koleo_weight * koleo
            metrics["koleo"] = koleo.detach()
        if c.ibot_weight:
            ibot = self.ibot_loss(s_tokens, t_tokens, mask, temp)
            loss = loss + c.ibot_weight * ibot + 0.0 * self.mask_token.sum()  # the token joins every step (DDP)
            metrics["ibot_loss"] = ibot.detach()
        return loss, metrics

    def ibot_mask(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(B, N) bool: ibot_mask_probability of the images get a ratio uniform in ibot_mask_ratio of their
        patches masked, at random positions; the others none."""
        b, n = images.shape[0], self.model.patch_embed.grid_for(images.shape[-2:])
        n = n[0] * n[1]
        low, high = self.cfg.ibot_mask_ratio
        masked = torch.rand(b, device=images.device, generator=generator) < self.cfg.ibot_mask_probability
        ratios = low + (high - low) * torch.rand(b, device=images.device, generator=generator)
        counts = (ratios * n).round().long().clamp(min=1) * masked
        ranks = torch.rand(b, n, device=images.device, generator=generator).argsort(dim=1).argsort(dim=1)
        return ranks < counts.unsqueeze(1)

    def ibot_loss(self, s_tokens: torch.Tensor, t_tokens: torch.Tensor, mask: torch.Tensor, temp: float) -> torch.Tensor:
        """Cross-entropy of the student's masked patch tokens against the teacher's, averaged over each
        image's masked patches, then over the images with a mask."""
        prefix = self.model.num_prefix_tokens
        if not mask.any():
            return s_tokens.new_zeros((), dtype=torch.float32)
        s = self.head(s_tokens[:, prefix:][mask]).float() / self.cfg.student_temp
        with torch.no_grad():
            t_out = self.teacher["head"](t_tokens[:, prefix:][mask])
        centre = self.patch_centre if self.cfg.centering == "centre" else None
        t = teacher_targets(t_out, centre, temp)
        per_patch = torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1)
        weights = (1.0 / mask.sum(dim=1).clamp(min=1)).unsqueeze(1).expand_as(mask)[mask]
        loss = (per_patch * weights).sum() / mask.any(dim=1).sum()
        if self.training and centre is not None:
            self.patch_centre.copy_(updated_centre(self.patch_centre, t_out, self.cfg.center_momentum))
        return loss

    @torch.no_grad()
    def consistency(self, images: torch.Tensor, teacher_backbone: nn.Module) -> torch.Tensor:
        """The evaluation loss: student against teacher on the same (un-augmented) images, at the final
        temperatures, centred, the centre left as it is."""
        t = self.teacher["head"](teacher_backbone.forward_head(teacher_backbone.forward_features(images), pre_logits=True))
        s = self.head(self.model.forward_head(self.model.forward_features(images), pre_logits=True))
        return cross_view_loss(torch.cat([s, s]), torch.cat([t, t]), self.running_centre, student_views=2, teacher_views=2,
                               student_temp=self.cfg.student_temp, teacher_temp=self.cfg.teacher_temp)

    @torch.no_grad()
    def evaluate(self, encoder: nn.Module, batches: Iterable, device: torch.device,
                 amp_dtype: torch.dtype | None) -> dict[str, Any]:
        was = self.model.training
        self.model.eval()
        try:
            return super().evaluate(encoder, batches, device, amp_dtype)
        finally:
            self.model.train(was)
