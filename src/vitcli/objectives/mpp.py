"""Masked patch prediction, the ViT paper's self-supervised objective (§4.6, Appendix B.1.2).

50% of the patch embeddings are corrupted: 80% of those replaced by a learnable [mask] embedding, 10% by
another random patch embedding (from the batch), 10% left unchanged. The encoder runs on all of them;
a linear head on each corrupted patch's output token predicts its 3-bit mean colour (512 classes for
RGB), or, as the paper's alternatives, its 4x4 downsized colours (16 predictions of 512 classes) or its
pixels (L2 regression of the normalised patch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitcli.errors import VitError
from vitcli.objectives.patches import MASK, RANDOM, color_classes, draw_corruption, mean_colors, patchify
from vitcli.objectives.selfsup import SelfSupervised

TARGETS = ("mean_color", "downsized", "pixels")
DOWNSIZED_CELLS = 4  # the paper's 4x4 downsized patch
MAX_OUTPUTS = 2 ** 16  # per patch: the head's width


class MaskedPatchPrediction(SelfSupervised):
    name = "mpp"

    @classmethod
    def from_recipe(cls, cfg, model: nn.Module, given) -> MaskedPatchPrediction:
        patch, mpp = cls.patch_size(model), cfg.mpp
        channels = model.patch_embed.in_chans
        if mpp.target == "downsized" and patch % DOWNSIZED_CELLS:
            raise VitError(f"'objective.mpp.target' downsized predicts each patch's 4x4 downsized colours, which needs a "
                           f"patch size divisible by 4; this model's patches are {patch}x{patch}. Use mean_color or "
                           "pixels, or a model with patches of 4, 8, 16 ...")
        classes = 2 ** (mpp.bits * channels) * (DOWNSIZED_CELLS ** 2 if mpp.target == "downsized" else 1)
        if mpp.target != "pixels" and classes > MAX_OUTPUTS:
            raise VitError(f"'objective.mpp.bits' {mpp.bits} on {channels} channels gives {classes:,} outputs per "
                           f"patch (at most {MAX_OUTPUTS:,}); the paper's 3 bits give 512 colours.")
        return cls(model, mean=given.mean, std=given.std, mask_ratio=mpp.mask_ratio, target=mpp.target,
                   bits=mpp.bits, replace=tuple(mpp.replace), fewshot=given.fewshot)

    def __init__(self, model: nn.Module, *, mean: tuple[float, ...], std: tuple[float, ...], mask_ratio: float = 0.5,
                 target: str = "mean_color", bits: int = 3, replace: tuple[float, float, float] = (0.8, 0.1, 0.1),
                 fewshot=None):
        super().__init__(model, fewshot)
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        self.patch, channels = model.patch_embed.patch_size[0], model.patch_embed.in_chans
        self.mask_ratio, self.target, self.bits, self.replace = mask_ratio, target, bits, tuple(replace)
        self.cells = DOWNSIZED_CELLS if target == "downsized" else 1
        self.classes = 2 ** (bits * channels)
        outputs = self.patch * self.patch * channels if target == "pixels" else self.cells ** 2 * self.classes
        self.mask_token = nn.Parameter(torch.zeros(1, 1, model.embed_dim))
        self.head = nn.Linear(model.embed_dim, outputs)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        # the loader's normalisation, undone to read colours in [0, 1]
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1), persistent=False)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """(B, N) colour classes, (B, N, 16) for downsized, or (B, N, p*p*C) normalised pixels."""
        if self.target == "pixels":
            return patchify(images.float(), self.patch)
        colors = mean_colors(images.float() * self.std + self.mean, self.patch, self.cells)
        classes = color_classes(colors, self.bits)
        return classes[:, :, 0] if self.cells == 1 else classes

    def corrupt(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(corrupted embeddings, how each patch was corrupted: 0 / MASK / RANDOM / UNCHANGED)."""
        b, n, d = tokens.shape
        how = draw_corruption(b, n, self.mask_ratio, self.replace, tokens.device, generator)
        donors = torch.randint(b * n, (b, n), device=tokens.device, generator=generator)
        x = torch.where((how == MASK).unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        x = torch.where((how == RANDOM).unsqueeze(-1), tokens.reshape(b * n, d)[donors], x)
        return x, how

    def loss(self, encoder: nn.Module, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x, how = self.corrupt(encoder.patch_embed(images), generator)
        corrupted = how > 0
        out = encoder.encode_patches(x)[:, encoder.num_prefix_tokens:]
        pred = self.head(out[corrupted]).float()
        target = self.targets(images)[corrupted]
        if self.target == "pixels":
            return F.mse_loss(pred, target)
        return F.cross_entropy(pred.reshape(-1, self.classes), target.reshape(-1))
