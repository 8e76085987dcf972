"""The paper's hybrid (§3.1): a ResNet feature map, not raw pixels, is cut into "patches".

R50+ViT-B/16 uses the first three stages (3, 4, 9) of a ResNet-50 v2 variant (non-pre-activation
bottlenecks, weight-standardised convs, GroupNorm) with TF "SAME" padding: stride 16, 1024 channels.
Each 1x1 cell of that map becomes a token through a 1x1 conv `proj`. Names and shapes equal timm's
`vit_base_r50_s16_224`, so state dicts load strict both ways.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from vitcli.models.layers import check_input_size, grid_of, to_2tuple
from vitcli.models.vit import VisionTransformer

STEM_CHANNELS = 64
STAGE_CHANNELS = (256, 512, 1024, 2048)


def pad_same(x: torch.Tensor, kernel: Sequence[int], stride: Sequence[int], value: float = 0.0) -> torch.Tensor:
    """TF 'SAME' padding: output side = ceil(input / stride); any odd extra pixel goes bottom/right."""
    pads = []
    for size, k, s in zip(x.shape[-2:], kernel, stride):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    (top, bottom), (left, right) = pads
    if top or bottom or left or right:
        x = F.pad(x, (left, right, top, bottom), value=value)
    return x


class StdConv2dSame(nn.Conv2d):
    """Bias-free conv whose weight is standardised per output channel (BiT), with 'SAME' padding.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        kernel_size: square kernel side.
        stride: stride.
        eps: added to the weight variance; 1e-8 as in the original hybrid checkpoints.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, eps: float = 1e-8) -> None:
        super().__init__(in_chs, out_chs, kernel_size, stride=stride, padding=0, bias=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(x, self.kernel_size, self.stride)
        w = self.weight
        var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
        w = (w - mean) * torch.rsqrt(var + self.eps)
        return F.conv2d(x, w, None, self.stride)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm(32) optionally followed by ReLU.

    Args:
        num_channels: channels to normalise.
        act: apply ReLU after the norm.
    """

    def __init__(self, num_channels: int, act: bool = True) -> None:
        super().__init__(32, num_channels, eps=1e-5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        return F.relu(x) if self.act else x


class Stem(nn.Module):
    """7x7/2 conv, norm + ReLU, 3x3/2 max-pool ('SAME', padded with -inf so pads never win)."""

    def __init__(self, in_chans: int, out_chs: int = STEM_CHANNELS) -> None:
        super().__init__()
        self.conv = StdConv2dSame(in_chans, out_chs, 7, stride=2)
        self.norm = GroupNormAct(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = pad_same(self.norm(self.conv(x)), (3, 3), (2, 2), value=float("-inf"))
        return F.max_pool2d(x, 3, 2)


class Downsample(nn.Module):
    """Projection shortcut: 1x1 strided conv + norm (no ReLU)."""

    def __init__(self, in_chs: int, out_chs: int, stride: int) -> None:
        super().__init__()
        self.conv = StdConv2dSame(in_chs, out_chs, 1, stride=stride)
        self.norm = GroupNormAct(out_chs, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """Non-pre-activation bottleneck (1x1 -> 3x3 strided -> 1x1, width out/4), ReLU after the sum.

    Args:
        in_chs: input channels.
        out_chs: output channels.
        stride: stride of the 3x3 conv (and of the shortcut).
        downsample: use a projection shortcut (first block of a stage).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, downsample: bool = False) -> None:
        super().__init__()
        mid = out_chs // 4
        self.downsample = Downsample(in_chs, out_chs, stride) if downsample else None
        self.conv1 = StdConv2dSame(in_chs, mid, 1)
        self.norm1 = GroupNormAct(mid)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride=stride)
        self.norm2 = GroupNormAct(mid)
        self.conv3 = StdConv2dSame(mid, out_chs, 1)
        self.norm3 = GroupNormAct(out_chs, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class Stage(nn.Module):
    """`depth` bottlenecks; the first projects the shortcut and carries the stride."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[
            Bottleneck(in_chs if i == 0 else out_chs, out_chs, stride if i == 0 else 1, downsample=i == 0)
            for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetBackbone(nn.Module):
    """ResNet stem + stages, no final norm and no head (timm's non-pre-activation ResNetV2 has neither).

    Args:
        layers: blocks per stage; (3, 4, 9) gives stride 16 and 1024 channels.
        in_chans: image channels.
    """

    def __init__(self, layers: Sequence[int] = (3, 4, 9), in_chans: int = 3) -> None:
        super().__init__()
        self.stem = Stem(in_chans)
        self.stages = nn.Sequential()
        chs = STEM_CHANNELS
        for i, depth in enumerate(layers):
            self.stages.add_module(str(i), Stage(chs, STAGE_CHANNELS[i], depth, stride=1 if i == 0 else 2))
            chs = STAGE_CHANNELS[i]
        self.num_features = chs
        self.num_strided = 2 + len(layers) - 1  # stem conv, stem pool, every stage after the first
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's ResNetV2 init: He-normal convs; unit norms, except each block's last norm starts at 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.norm3.weight)

    def feature_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        """Output map size: every stride-2 layer with 'SAME' padding rounds up."""
        h, w = img_size
        for _ in range(self.num_strided):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        return h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))


class HybridEmbed(nn.Module):
    """CNN feature map -> tokens: backbone, then a patch_size x patch_size conv `proj` to embed_dim.

    Args:
        img_size: input size, int or (h, w).
        patch_size: patch side on the feature map (1 in the paper).
        in_chans: image channels.
        embed_dim: token width.
        layers: ResNet blocks per stage.
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 1, in_chans: int = 3,
                 embed_dim: int = 768, layers: Sequence[int] = (3, 4, 9)) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.in_chans = in_chans
        self.backbone = ResNetBackbone(layers, in_chans)
        fh, fw = self.backbone.feature_size(self.img_size)
        self.grid_size = (fh // patch_size, fw // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(self.backbone.num_features, embed_dim, patch_size, stride=patch_size)

    def grid_for(self, size: Sequence[int]) -> tuple[int, int]:
        """The token grid of an image of `size` (h, w): any multiple of the CNN's stride times the patch."""
        stride = [s // g for s, g in zip(self.img_size, self.grid_size)]
        return grid_of(size, stride)

    def forward(self, x: torch.Tensor, any_size: bool = False) -> torch.Tensor:
        check_input_size(x, None if any_size else self.img_size, self.in_chans)
        if any_size:
            self.grid_for(x.shape[-2:])
        return self.proj(self.backbone(x)).flatten(2).transpose(1, 2)


def hybrid_vit(layers: Sequence[int] = (3, 4, 9), **vit_kwargs) -> VisionTransformer:
    """A VisionTransformer whose patch embedding is a ResNet with `layers` (patch_size 1 by default)."""
    vit_kwargs.setdefault("patch_size", 1)
    return VisionTransformer(embed_layer=partial(HybridEmbed, layers=tuple(layers)), **vit_kwargs)
