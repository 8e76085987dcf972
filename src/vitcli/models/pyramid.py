"""ViTDet's simple feature pyramid (Li et al., ECCV 2022, §3 and Fig. 2c; detectron2's `SimpleFeaturePyramid`).

A plain ViT has one feature map, at the patch stride. The pyramid builds four from it alone: x4 by two
stride-2 deconvolutions (LayerNorm and GELU between), x2 by one, x1 as it is, x1/2 by a stride-2 max pool;
each then through a 1x1 and a 3x3 convolution to 256 channels, both without bias and followed by a
LayerNorm over channels. A fifth, coarser map is a stride-2 subsampling of the coarsest (detectron2's
LastLevelMaxPool; torchvision's FPN names it "pool"). With 16-px patches the strides are 4, 8, 16, 32
and 64; with 14-px patches 3.5, 7, 14, 28 and 56.

The output is an OrderedDict of maps named "0", "1", ... and "pool", and the module has `out_channels`:
the backbone contract of torchvision's detection models, whose default anchor generators and RoI poolers
read those names.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d
from torch import nn

SCALE_FACTORS = (4.0, 2.0, 1.0, 0.5)


def _rescale(dim: int, scale: float) -> tuple[nn.Module, int]:
    """The layers that bring a stride-s map to stride s / scale, and their output width (ViTDet's)."""
    if scale == 4.0:
        return nn.Sequential(nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2), nn.GELU(),
                             nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)), dim // 4
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), dim // 2
    if scale == 1.0:
        return nn.Identity(), dim
    if scale == 0.5:
        return nn.MaxPool2d(2, stride=2), dim
    raise ValueError(f"scale factors are 4, 2, 1 or 0.5; got {scale}")


class SimpleFeaturePyramid(nn.Module):
    """(B, D, h, w) patch features -> OrderedDict of (B, out_channels, h * s, w * s) maps, finest first."""

    def __init__(self, dim: int, out_channels: int = 256, scale_factors: Sequence[float] = SCALE_FACTORS,
                 top_pool: bool = True):
        super().__init__()
        self.out_channels = out_channels
        self.scale_factors = tuple(scale_factors)
        self.top_pool = top_pool
        self.stages = nn.ModuleList()
        for scale in self.scale_factors:
            rescale, width = _rescale(dim, scale)
            self.stages.append(nn.Sequential(
                rescale,
                nn.Conv2d(width, out_channels, 1, bias=False), LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False), LayerNorm2d(out_channels)))

    def forward(self, features: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        maps = OrderedDict((str(i), stage(features)) for i, stage in enumerate(self.stages))
        if self.top_pool:
            maps["pool"] = F.max_pool2d(maps[str(len(self.stages) - 1)], kernel_size=1, stride=2)
        return maps
