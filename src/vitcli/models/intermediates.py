"""Dense features from a ViT: `forward_intermediates`, with timm's signature and results.

Dense heads (segmentation decoders, a detector's feature pyramid) read the encoder through this one call:
the tokens after chosen blocks, prefix tokens (class, distillation, registers) split off, patch tokens
as NCHW grids. Inputs may have any size the patch size divides: the learned position table is resampled
to the grid (bicubic, as timm's `dynamic_img_size`), rotary embeddings are computed for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional, Union

import torch

from vitcli.errors import VitError

Indices = Optional[Union[int, Sequence[int]]]


def take_indices(depth: int, indices: Indices) -> list[int]:
    """Absolute block indices: all (None), the last n (an int), or those listed (negative from the end)."""
    if indices is None:
        return list(range(depth))
    if isinstance(indices, int):
        if not 0 < indices <= depth:
            raise VitError(f"cannot take the last {indices} of {depth} blocks: ask for 1 to {depth}")
        return list(range(depth - indices, depth))
    taken = [i + depth if i < 0 else i for i in indices]
    bad = [i for i, t in zip(indices, taken) if not 0 <= t < depth]
    if bad:
        raise VitError(f"block indices {bad} are out of range for a {depth}-block encoder (0 to {depth - 1}, or negative)")
    return taken


def patch_stride(model: torch.nn.Module) -> tuple[int, int]:
    """The encoder's stride in pixels per grid cell (the patch size; 16 for the hybrid's ResNet cells)."""
    embed = model.patch_embed
    return tuple(s // g for s, g in zip(embed.img_size, embed.grid_size))


def forward_intermediates(model: torch.nn.Module, x: torch.Tensor, indices: Indices = None, return_prefix_tokens: bool = False,
                          norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                          intermediates_only: bool = False):
    """timm's VisionTransformer.forward_intermediates for a model with `encoder_input(x) -> (tokens, grid,
    block keyword arguments)`, `blocks`, `norm` and `num_prefix_tokens`.

    Returns the intermediates (list; with return_prefix_tokens, (patch grid, prefix tokens) pairs), or,
    unless intermediates_only, (final normalised tokens, intermediates). norm: pass each through the
    final norm; stop_early: skip blocks after the last one taken (then the final tokens are not the model's).
    """
    if output_fmt not in ("NCHW", "NLC"):
        raise VitError(f"output_fmt must be NCHW or NLC, got {output_fmt!r}")
    take = take_indices(len(model.blocks), indices)
    tokens, (h, w), kwargs = model.encoder_input(x)
    blocks = list(model.blocks)[: max(take) + 1] if stop_early else list(model.blocks)
    taken = []
    for i, block in enumerate(blocks):
        tokens = block(tokens, **kwargs)
        if i in take:
            taken.append(model.norm(tokens) if norm else tokens)
    n = model.num_prefix_tokens
    prefix = [t[:, :n] for t in taken]
    grids = [t[:, n:] for t in taken]
    if output_fmt == "NCHW":
        grids = [g.reshape(g.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous() for g in grids]
    out = list(zip(grids, prefix)) if return_prefix_tokens and n else grids
    return out if intermediates_only else (model.norm(tokens), out)


def masked_patches(patches: torch.Tensor, mask: torch.Tensor | None, token: torch.Tensor | None) -> torch.Tensor:
    """Patch embeddings (B, N, D) with those where `mask` (B, N) is true replaced by `token` (D,)."""
    if mask is None:
        return patches
    return torch.where(mask.unsqueeze(-1), token.to(patches.dtype), patches)


def encode(model: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None = None,
           mask_token: torch.Tensor | None = None) -> torch.Tensor:
    """Images of any size the patch size divides -> the final normalised tokens (B, prefix + N, D), position
    embeddings resampled (or rotary ones built) for the grid: what DINO's multi-crop student sees. With
    `mask` the masked patches enter as `mask_token` (iBOT)."""
    tokens, _, kwargs = model.encoder_input(x, mask=mask, mask_token=mask_token)
    for block in model.blocks:
        tokens = block(tokens, **kwargs)
    return model.norm(tokens)

