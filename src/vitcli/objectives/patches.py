"""Patches and masks for the self-supervised objectives.

- `patchify` / `unpatchify`: images (B, C, H, W) <-> patches (B, N, p*p*C), patches in the order of
  the model's grid (row-major, as PatchEmbed flattens it), pixels inside a patch as (row, column, channel).
- `random_masking` (MAE): a random permutation per image; the first K = int(N (1 - ratio)) patches stay.
- `draw_corruption` (MPP): exactly round(ratio N) patches per image are corrupted; each of those is
  replaced by the [mask] embedding, by another random patch embedding, or left unchanged, with the
  given probabilities (the paper: 80 / 10 / 10).
- `color_classes`: the paper's 3-bit colour targets: channel values in [0, 1] quantised to 2^bits
  levels, combined into one class (512 for RGB at 3 bits).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

MASK, RANDOM, UNCHANGED = 1, 2, 3  # how a corrupted patch is corrupted (0: not corrupted)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    b, c, h, w = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, c, gh, patch, gw, patch)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, grid: tuple[int, int], channels: int) -> torch.Tensor:
    b = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(b, gh, gw, patch, patch, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(b, channels, gh * patch, gw * patch)


class Masking(NamedTuple):
    keep: torch.Tensor  # (B, K) indices of the visible patches, in the shuffled order
    restore: torch.Tensor  # (B, N) undoes the shuffle: shuffled[restore] is grid order
    mask: torch.Tensor  # (B, N) float, 1 where a patch is masked (grid order)


def random_masking(batch: int, num_patches: int, ratio: float, device: torch.device,
                   generator: torch.Generator | None = None) -> Masking:
    """MAE's per-image random masking of int(N x ratio) patches (at least one patch stays visible)."""
    keep_n = max(1, int(num_patches * (1 - ratio)))
    noise = torch.rand(batch, num_patches, device=device, generator=generator)
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=device)
    mask[:, :keep_n] = 0
    return Masking(shuffle[:, :keep_n], restore, torch.gather(mask, 1, restore))


def draw_corruption(batch: int, num_patches: int, ratio: float, replace: tuple[float, float, float],
                    device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, N) int: 0 for untouched patches, else MASK / RANDOM / UNCHANGED for the corrupted ones."""
    count = max(1, round(num_patches * ratio))
    order = torch.argsort(torch.rand(batch, num_patches, device=device, generator=generator), dim=1)
    corrupted = torch.zeros(batch, num_patches, dtype=torch.bool, device=device)
    corrupted.scatter_(1, order[:, :count], True)
    u = torch.rand(batch, num_patches, device=device, generator=generator)
    how = torch.where(u < replace[0], MASK, torch.where(u < replace[0] + replace[1], RANDOM, UNCHANGED))
    return torch.where(corrupted, how, 0)


def color_classes(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., C) channel values in [0, 1] -> (...) class ids in [0, 2^(bits C)): each channel quantised
    to 2^bits levels, the first channel most significant."""
    levels = 2 ** bits
    q = (values.clamp(0, 1) * levels).floor().clamp(max=levels - 1).long()
    weights = levels ** torch.arange(q.shape[-1] - 1, -1, -1, device=q.device)
    return (q * weights).sum(-1)


def mean_colors(pixels: torch.Tensor, patch: int, cells: int = 1) -> torch.Tensor:
    """Pixels (B, C, H, W) in [0, 1] -> (B, N, cells^2, C): the mean colour of each of cells x cells
    equal parts of every patch (cells 1: the patch's mean colour; 4: the paper's 4x4 downsized patch)."""
    small = F.avg_pool2d(pixels, patch // cells)  # (B, C, gh * cells, gw * cells)
    return patchify(small, cells).reshape(pixels.shape[0], -1, cells * cells, pixels.shape[1])
