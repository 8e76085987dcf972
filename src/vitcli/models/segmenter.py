"""Semantic segmentation with a plain ViT: Segmenter (Strudel et al., ICCV 2021).

The encoder is any vitcli ViT (or Eva, or the hybrid), read through `forward_intermediates`: the last
block's patch tokens after the final norm, prefix tokens dropped, as an (h, w) grid. A decoder maps the
grid to K class maps at patch resolution, upsampled bilinearly to the input:

- `linear`: one linear layer per patch token (Segmenter's DecoderLinear; DINOv2's linear probe without
  its BatchNorm and extra layers).
- `mask_transformer`: the patch tokens, projected to the decoder width, and K learned class embeddings
  go through `layers` transformer blocks together; each mask is the scalar product of L2-normalised
  patch and class embeddings (each through its own learned projection), LayerNorm over the K masks
  (Segmenter §3.2, segm/model/decoder.py).

Inputs of any size are padded (zeros, bottom and right) to the patch stride and the masks cut back.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vitcli.models.intermediates import patch_stride
from vitcli.models.layers import Block, init_linears

DECODERS = ("linear", "mask_transformer")
Decoder = Literal["linear", "mask_transformer"]


class LinearDecoder(nn.Module):
    """(B, D, h, w) patch grid -> (B, K, h, w) class scores: one linear layer per token."""

    def __init__(self, encoder_dim: int, num_classes: int):
        super().__init__()
        self.head = nn.Linear(encoder_dim, num_classes)
        self.settings: dict = {"kind": "linear"}
        init_linears(self)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.head(grid.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MaskTransformer(nn.Module):
    """Segmenter's mask transformer: K class embeddings decoded jointly with the patch tokens."""

    def __init__(self, encoder_dim: int, num_classes: int, *, dim: int | None = None, layers: int = 2,
                 heads: int | None = None, drop_path: float = 0.0, dropout: float = 0.1):
        super().__init__()
        dim = dim or encoder_dim
        heads = heads or max(1, dim // 64)
        self.settings = {"kind": "mask_transformer", "dim": dim, "layers": layers, "heads": heads, "drop_path": drop_path,
                         "dropout": dropout}  # what rebuilds it (a checkpoint's `decoder`)
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(encoder_dim, dim)
        rates = torch.linspace(0, drop_path, layers, device="cpu").tolist()
        # Segmenter's blocks: pre-norm attention + MLP (4x), dropout on the attention weights and after every dense
        # layer but qkv, torch's LayerNorm epsilon
        self.blocks = nn.ModuleList([Block(dim, heads, 4.0, True, dropout, rates[i], dropout, norm_eps=1e-5) for i in range(layers)])
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dim))
        self.proj_patch = nn.Parameter(torch.randn(dim, dim) * dim**-0.5)
        self.proj_classes = nn.Parameter(torch.randn(dim, dim) * dim**-0.5)
        self.decoder_norm = nn.LayerNorm(dim)
        self.mask_norm = nn.LayerNorm(num_classes)
        init_linears(self)
        nn.init.trunc_normal_(self.cls_emb, std=0.02)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        b, _, h, w = grid.shape
        x = self.proj_dec(grid.flatten(2).transpose(1, 2))
        x = torch.cat([x, self.cls_emb.expand(b, -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_norm(x)
        patches, classes = x[:, : -self.num_classes] @ self.proj_patch, x[:, -self.num_classes:] @ self.proj_classes
        masks = F.normalize(patches, dim=-1) @ F.normalize(classes, dim=-1).transpose(1, 2)  # (B, h*w, K)
        return self.mask_norm(masks).transpose(1, 2).reshape(b, self.num_classes, h, w)


def make_decoder(kind: Decoder, encoder_dim: int, num_classes: int, **settings) -> nn.Module:
    """A decoder by kind; `settings` as a decoder's own `settings` (a checkpoint's) or the recipe's."""
    if kind == "linear":
        return LinearDecoder(encoder_dim, num_classes)
    return MaskTransformer(encoder_dim, num_classes, **settings)


class Segmenter(nn.Module):
    """encoder + decoder -> (B, K, H, W) class scores for (B, C, H, W) images of any size."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder, self.decoder, self.num_classes = encoder, decoder, num_classes
        self.stride = patch_stride(encoder)

    @property
    def config(self):
        """The encoder's (a registered ViT's) config: what the checkpoint's model / model_args describe."""
        return self.encoder.config

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    @property
    def blocks(self) -> nn.Module:
        """The encoder's blocks: what activation checkpointing and FSDP wrap one by one."""
        return self.encoder.blocks

    def get_classifier(self) -> nn.Module:
        """The decoder: timm's name for a model's task head (optim.head_lr_scale scales its rate)."""
        return self.decoder

    def reset_classifier(self, num_classes: int) -> None:
        """A new decoder of the same kind and settings for `num_classes` classes (fine-tuning on other classes)."""
        settings = {k: v for k, v in self.decoder.settings.items() if k != "kind"}
        ref = next(self.encoder.parameters())
        self.decoder = make_decoder(self.decoder.settings["kind"], self.embed_dim, num_classes, **settings).to(ref.device)
        self.num_classes = num_classes

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h, w = images.shape[-2:]
        sh, sw = self.stride
        padded = F.pad(images, (0, -w % sw, 0, -h % sh))
        grid = self.encoder.forward_intermediates(padded, indices=1, norm=True, intermediates_only=True)[0]
        masks = F.interpolate(self.decoder(grid), size=padded.shape[-2:], mode="bilinear", align_corners=False)
        return masks[..., :h, :w]

    def no_weight_decay(self) -> set[str]:
        """The encoder's tables and tokens, and the decoder's class embeddings (Segmenter's)."""
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()} | {"decoder.cls_emb"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer decay over the encoder's depth (timm.optim); the decoder, matched by nothing, is timm's head:
        the last group, at the full rate (the final norm joins the last block, as in timm's ViT)."""
        inner = self.encoder.group_matcher(coarse)
        stem = "|".join(f"^encoder.{p.lstrip('^')}" for p in inner["stem"].split("|"))
        return {"stem": stem, "blocks": [(r"^encoder\.blocks\.(\d+)", None), (r"^encoder\.norm", (99999,))]}
