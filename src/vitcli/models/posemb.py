"""Resizing learned embeddings when the image or patch size changes.

- `resample_pos_embed`: paper §3.2, fine-tuning at a higher resolution keeps the patch size, so the
  sequence grows; the learned position embeddings are 2D-interpolated to the new grid. Same numbers
  as `timm.layers.resample_abs_pos_embed`.
- `resize_patch_embed`: FlexiViT (Beyer et al., 2023) "PI-resize" of the patch-embedding kernel, so
  that a resized patch seen through the resized kernel gives the same token as the original.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vitcli.errors import VitError
from vitcli.models.layers import to_2tuple

MODES = ("bicubic", "bilinear", "nearest", "area")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise VitError(f"interpolation mode must be one of {', '.join(MODES)}, got {mode!r}")


def resample_pos_embed(pos_embed: torch.Tensor, new_grid: int | Sequence[int],
                       old_grid: int | Sequence[int] | None = None, num_prefix_tokens: int = 1,
                       mode: str = "bicubic", antialias: bool = True) -> torch.Tensor:
    """Interpolate the grid part of a (1, prefix + h*w, D) position embedding to new_grid.

    Args:
        pos_embed: (1, num_prefix_tokens + old_h * old_w, D).
        new_grid: target patch grid, int or (h, w).
        old_grid: current grid; inferred as square when None.
        num_prefix_tokens: leading tokens (class token) copied unchanged.
        mode: F.interpolate mode ('bicubic' as timm; the paper's JAX code used bilinear-like zoom).
        antialias: timm's default. Low-passes when shrinking; note that for bicubic it also switches
            PyTorch to the PIL-style cubic kernel (a=-0.5) when growing, so it changes results both ways.
    """
    _check_mode(mode)
    n_grid = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(n_grid)
        if side * side != n_grid:
            raise VitError(f"position embedding has {n_grid} grid tokens, not a square; pass old_grid=(h, w)")
        old_grid = side
    old_h, old_w = to_2tuple(old_grid)
    new_h, new_w = to_2tuple(new_grid)
    if old_h * old_w != n_grid:
        raise VitError(f"old_grid {old_h}x{old_w} does not match the {n_grid} grid tokens in pos_embed")
    if (old_h, old_w) == (new_h, new_w):
        return pos_embed
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)  # interpolate wants float32
    aa = antialias and mode in ("bilinear", "bicubic")
    grid = F.interpolate(grid, size=(new_h, new_w), mode=mode, antialias=aa)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_h * new_w, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def resize_matrix(old_size: Sequence[int], new_size: Sequence[int], mode: str = "bicubic",
                  antialias: bool = True) -> torch.Tensor:
    """B with resize(x).flatten() == B @ x.flatten(): (new_h*new_w, old_h*old_w), built by resizing each
    basis image (resizing is linear)."""
    _check_mode(mode)
    oh, ow = old_size
    basis = torch.eye(oh * ow, dtype=torch.float64).reshape(oh * ow, 1, oh, ow)
    aa = antialias and mode in ("bilinear", "bicubic")
    resized = F.interpolate(basis, size=tuple(new_size), mode=mode, antialias=aa)
    return resized.reshape(oh * ow, -1).T


def resize_patch_embed(weight: torch.Tensor, new_patch_size: int | Sequence[int], mode: str = "bicubic",
                       antialias: bool = True) -> torch.Tensor:
    """FlexiViT PI-resize of a (D, C, p, p) patch-embedding kernel to new_patch_size.

    Solves for w' = pinv(B^T) w so that <x, w> = <B x, w'> for every patch x, where B resizes patches
    (`resize_matrix`). Exact when growing the patch; a least-squares fit when shrinking it.
    """
    if weight.ndim != 4:
        raise VitError(f"expected a (out, in, h, w) conv kernel, got shape {tuple(weight.shape)}")
    new_h, new_w = to_2tuple(new_patch_size)
    old_h, old_w = weight.shape[-2:]
    if (old_h, old_w) == (new_h, new_w):
        return weight
    b = resize_matrix((old_h, old_w), (new_h, new_w), mode, antialias).to(weight.device)
    pinv = torch.linalg.pinv(b.T)  # (new, old); float64 keeps the inverse accurate
    out = weight.reshape(*weight.shape[:2], -1).to(torch.float64) @ pinv.T
    return out.reshape(*weight.shape[:2], new_h, new_w).to(weight.dtype)
