"""Window attention for a plain ViT's blocks, as ViTDet runs them (Li et al., ECCV 2022, §3; detectron2's
`projects/ViTDet`, `modeling/backbone/vit.py`).

A windowed block attends within non-overlapping size x size squares of the patch grid. As in ViTDet the
grid is padded with zeros after the block's first LayerNorm (the padding takes part as keys, unmasked) and
the MLP runs on every token as usual; a few blocks stay global so information crosses windows. ViTDet adds
a relative position bias; it is left out here (the issue makes it optional): the encoder's own absolute
table, resampled to the grid, carries position, and any vitcli checkpoint loads without new parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def window_partition(x: torch.Tensor, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, D) -> (B * windows, size * size, D) with the grid zero-padded to multiples of `size`,
    and the padded (H, W)."""
    b, h, w, d = x.shape
    pad_h, pad_w = -h % size, -w % size
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // size, size, wp // size, size, d).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, size * size, d), (hp, wp)


def window_unpartition(windows: torch.Tensor, size: int, padded: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
    """The inverse of window_partition: (B * windows, size * size, D) -> (B, H, W, D), padding cut off."""
    hp, wp = padded
    d = windows.shape[-1]
    b = windows.shape[0] // ((hp // size) * (wp // size))
    x = windows.view(b, hp // size, wp // size, size, size, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, d)
    return x[:, : grid[0], : grid[1]]


def windowed_block(block: nn.Module, x: torch.Tensor, size: int) -> torch.Tensor:
    """One pre-LN block (layers.Block) on a (B, H, W, D) grid with attention inside size x size windows."""
    h, w = x.shape[1:3]
    windows, padded = window_partition(block.norm1(x), size)
    attended = window_unpartition(block.attn(windows), size, padded, (h, w))
    x = x + block.drop_path1(block.ls1(attended))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
