"""Masked autoencoder (He et al., 2022): mask 75% of the patches at random; the encoder sees only the
visible ones (and the class token); a light decoder fills in [mask] tokens and reconstructs every
patch; the loss is the mean squared error on the masked patches only, against per-patch normalised
pixels by default (`norm_pix_loss`).

The decoder follows the MAE reference: a linear map from the encoder width, a learned [mask] token,
fixed 2D sine-cosine position embeddings, pre-LayerNorm blocks, a LayerNorm and a linear prediction of
the patch's pixels.
"""

from __future__ import annotations

import torch
from torch import nn

from vitcli.errors import VitError
from vitcli.models.layers import Block
from vitcli.objectives.patches import Masking, patchify, random_masking
from vitcli.objectives.selfsup import SelfSupervised

NORM_PIX_EPS = 1e-6


def sincos_pos_embed(dim: int, grid: tuple[int, int], prefix: int = 1) -> torch.Tensor:
    """(1, prefix + gh * gw, dim) fixed 2D sine-cosine position embeddings (MAE's), zeros for the prefix."""
    if dim % 4:
        raise ValueError(f"2D sine-cosine embeddings need a width divisible by 4, got {dim}")
    gh, gw = grid
    rows, cols = torch.meshgrid(torch.arange(gh, dtype=torch.float64), torch.arange(gw, dtype=torch.float64), indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def embed(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([embed(cols), embed(rows)], dim=1)  # width half, then height half (as MAE)
    return torch.cat([torch.zeros(prefix, dim, dtype=torch.float64), table]).float().unsqueeze(0)


class Decoder(nn.Module):
    def __init__(self, encoder_dim: int, grid: tuple[int, int], patch_pixels: int, dim: int, depth: int, heads: int,
                 prefix: int = 1):
        super().__init__()
        self.prefix = prefix
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid, prefix))
        self.blocks = nn.Sequential(*[Block(dim, heads, 4.0, True, 0.0, 0.0, 0.0) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pred = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, latent: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (B, prefix + K, D) -> predicted pixels of every patch (B, N, p*p*C), grid order."""
        x = self.embed(latent)
        head, visible = x[:, :self.prefix], x[:, self.prefix:]
        b, n, d = visible.shape[0], restore.shape[1], visible.shape[2]
        full = torch.cat([visible, self.mask_token.expand(b, n - visible.shape[1], d)], dim=1)
        full = torch.gather(full, 1, restore.unsqueeze(-1).expand(-1, -1, d))  # back to grid order
        x = torch.cat([head, full], dim=1) + self.pos_embed
        return self.pred(self.norm(self.blocks(x)))[:, self.prefix:]


class MaskedAutoencoder(SelfSupervised):
    name = "mae"

    @classmethod
    def from_recipe(cls, cfg, model: nn.Module, given) -> MaskedAutoencoder:
        cls.patch_size(model)
        mae = cfg.mae
        if mae.decoder_dim % 4:
            raise VitError(f"'objective.mae.decoder_dim' ({mae.decoder_dim}) must be divisible by 4: the decoder's 2D "
                           "sine-cosine position embeddings split it into 4 parts.")
        return cls(model, mask_ratio=mae.mask_ratio, decoder_dim=mae.decoder_dim, decoder_depth=mae.decoder_depth,
                   decoder_heads=mae.decoder_heads, norm_pix_loss=mae.norm_pix_loss, fewshot=given.fewshot)

    def __init__(self, model: nn.Module, *, mask_ratio: float = 0.75, decoder_dim: int = 512, decoder_depth: int = 8,
                 decoder_heads: int = 16, norm_pix_loss: bool = True, fewshot=None):
        super().__init__(model, fewshot)
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch = model.patch_embed.patch_size[0]
        self.grid = tuple(model.patch_embed.grid_size)
        channels = model.patch_embed.in_chans
        self.decoder = Decoder(model.embed_dim, self.grid, self.patch * self.patch * channels, decoder_dim,
                               decoder_depth, decoder_heads, model.num_prefix_tokens)

    def reconstruct(self, encoder: nn.Module, images: torch.Tensor, generator: torch.Generator | None = None,
                    ratio: float | None = None) -> tuple[torch.Tensor, torch.Tensor, Masking]:
        """(predicted patches (B, N, p*p*C), target patches, the masking), on `encoder`'s weights."""
        ratio = self.mask_ratio if ratio is None else ratio
        tokens = encoder.patch_embed(images)
        masking = random_masking(tokens.shape[0], tokens.shape[1], ratio, images.device, generator)
        pred = self.decoder(encoder.encode_patches(tokens, masking.keep), masking.restore)
        target = patchify(images, self.patch)
        if self.norm_pix_loss:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + NORM_PIX_EPS).sqrt()
        return pred, target, masking

    def loss(self, encoder: nn.Module, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        pred, target, masking = self.reconstruct(encoder, images, generator)
        per_patch = ((pred.float() - target.float()) ** 2).mean(dim=-1)
        return (per_patch * masking.mask).sum() / masking.mask.sum()
