"""A vitcli encoder as a detection backbone, ViTDet's way (Li et al., ECCV 2022): the last block's patch
features, optionally with window attention in all but a few global blocks, under the simple feature
pyramid (models/pyramid.py). The result is torchvision's backbone contract (images -> OrderedDict of
maps, `out_channels`), so its FasterRCNN / RetinaNet / FCOS / MaskRCNN take it as it is.

A ViT (or the hybrid) runs on its patch tokens alone, as ViTDet does: prefix tokens (class, registers,
distillation) are dropped after the position embeddings are added, since a window has no place for them.
An encoder with rotary embeddings (Eva) is read through `forward_intermediates` with global attention.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitcli.errors import VitError
from vitcli.models.intermediates import patch_stride, take_indices
from vitcli.models.layers import Block
from vitcli.models.pyramid import SCALE_FACTORS, SimpleFeaturePyramid
from vitcli.models.windows import windowed_block


class ViTDetBackbone(nn.Module):
    """encoder + simple feature pyramid; `window_size` > 0 windows every block but `global_blocks`."""

    def __init__(self, encoder: nn.Module, *, window_size: int = 0, global_blocks: Sequence[int] = (),
                 out_channels: int = 256, scale_factors: Sequence[float] = SCALE_FACTORS):
        super().__init__()
        self.encoder = encoder
        self.plain = all(isinstance(b, Block) for b in encoder.blocks)  # attention without rotary tables
        if window_size < 0:
            raise VitError(f"model.window_size must be >= 0 (0: global attention everywhere); got {window_size}")
        if window_size and not self.plain:
            raise VitError("window attention is for ViT encoders; this one has rotary position embeddings (Eva). "
                           "Set model.window_size: 0 to detect with global attention.")
        self.window_size = window_size
        self.global_blocks = frozenset(take_indices(len(encoder.blocks), list(global_blocks)))
        self.pyramid = SimpleFeaturePyramid(encoder.embed_dim, out_channels, scale_factors)
        self.out_channels = out_channels

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) images -> (B, D, ceil(H / p), ceil(W / p)) features of the last block (before the
        encoder's final norm: the pyramid normalises, as ViTDet's does). Images are zero-padded at the bottom
        and right to the patch size, as torchvision pads a batch."""
        ph, pw = patch_stride(self.encoder)
        images = F.pad(images, (0, -images.shape[-1] % pw, 0, -images.shape[-2] % ph))
        if not self.plain:
            return self.encoder.forward_intermediates(images, indices=1, intermediates_only=True)[0]
        tokens, (h, w), _ = self.encoder.encoder_input(images)
        x = tokens[:, self.encoder.num_prefix_tokens:].unflatten(1, (h, w))
        for i, block in enumerate(self.encoder.blocks):
            if self.window_size and i not in self.global_blocks:
                x = windowed_block(block, x, self.window_size)
            else:
                x = block(x.flatten(1, 2)).unflatten(1, (h, w))
        return x.permute(0, 3, 1, 2)

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.pyramid(self.patch_features(images))
