"""The Vision Transformer of Dosovitskiy et al. (ICLR 2021), §3.1.

Parameter names and shapes equal timm's ``VisionTransformer`` for the same configuration, so state
dicts move between the two with ``load_state_dict(..., strict=True)`` and no key map.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitcli.errors import VitError

GLOBAL_POOLS = ("token", "avg")


def to_2tuple(size: int | Sequence[int]) -> tuple[int, int]:
    """(h, w) from an int or a 2-sequence."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def check_input_size(x: torch.Tensor, img_size: tuple[int, int], in_chans: int) -> None:
    """Raise VitError when a batch does not have the shape the model was built for."""
    expected = f"(batch, {in_chans}, {img_size[0]}, {img_size[1]})"
    if x.ndim != 4:
        raise VitError(f"expected a batch of images shaped {expected}, got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise VitError(f"expected images shaped {expected}, got {tuple(x.shape)}; build the model with "
                       f"in_chans={x.shape[1]} or convert the images")
    if tuple(x.shape[-2:]) != img_size:
        h, w = x.shape[-2:]
        raise VitError(
            f"expected {img_size[0]}x{img_size[1]} input images, got {h}x{w}; build the model with "
            f"img_size=({h}, {w}) (recipe: model.img_size) or resize the inputs")


class PatchEmbed(nn.Module):
    """Split the image into non-overlapping patches and project each to embed_dim (a strided conv).

    Args:
        img_size: input size, int or (h, w); each side must be a multiple of patch_size.
        patch_size: side of the square patches.
        in_chans: image channels.
        embed_dim: token width.
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = to_2tuple(patch_size)
        self.in_chans = in_chans
        if any(s % p for s, p in zip(self.img_size, self.patch_size)):
            raise VitError(
                f"image size {self.img_size[0]}x{self.img_size[1]} is not a multiple of the patch size "
                f"{patch_size}; choose img_size divisible by {patch_size}")
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_input_size(x, self.img_size, self.in_chans)
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    Args:
        dim: token width.
        num_heads: heads; dim must be divisible by it.
        qkv_bias: bias on the qkv projection.
        attn_drop: dropout on attention weights (training only).
        proj_drop: dropout after the output projection (the paper's dropout).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    """Two dense layers with a GELU between them.

    Args:
        dim: input and output width.
        hidden_dim: inner width (4 x dim in the paper).
        drop: dropout after each dense layer (the paper's dropout).
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample, rescaling survivors.

    Args:
        p: probability of dropping the branch.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-LN transformer encoder block (paper eq. 2-3).

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        qkv_bias: bias on the qkv projection.
        attn_drop: attention-weight dropout.
        drop_path: stochastic depth rate of this block.
        drop: dropout after every dense layer but qkv (the paper's dropout).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, drop_path: float = 0.0, drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """ViT: patch embedding + [class] token + learned 1D position embeddings + encoder + head.

    Args:
        img_size: input size, int or (h, w).
        patch_size: patch side (1 for the hybrid, whose patches are CNN feature-map cells).
        in_chans: image channels.
        num_classes: head outputs; 0 gives no head (forward returns pooled features).
        global_pool: 'token' (class token, the paper's default) or 'avg' (mean of patch tokens).
        embed_dim: token width D.
        depth: encoder blocks L.
        num_heads: attention heads.
        mlp_ratio: MLP width / D.
        qkv_bias: bias on the qkv projection.
        class_token: prepend a learned [class] token (required by global_pool='token').
        drop_rate: the paper's dropout: after every dense layer except the qkv projection, directly
            after adding the position embeddings, and before the head (timm splits this into
            proj_drop_rate, pos_drop_rate and drop_rate).
        attn_drop_rate: attention-weight dropout.
        drop_path_rate: stochastic depth of the last block; rises linearly from 0 over the blocks.
        embed_layer: factory called as embed_layer(img_size=, patch_size=, in_chans=, embed_dim=) that
            returns a module with `grid_size` and `num_patches`; lets the hybrid swap in a CNN.
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "token", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, class_token: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 embed_layer: Callable[..., nn.Module] = PatchEmbed) -> None:
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise VitError(f"global_pool must be one of {', '.join(GLOBAL_POOLS)}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise VitError("global_pool='token' needs the class token; use global_pool='avg' with "
                           "class_token=False")
        if embed_dim % num_heads:
            raise VitError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.config: Any = None  # set by the registry; a dataclass that rebuilds this model
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0

        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                       embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        # pos_embed includes a slot for the class token (original ViT / timm layout).
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + self.num_prefix_tokens,
                                                  embed_dim))
        # Stochastic depth rises linearly over the blocks; on cpu so it also works under a meta device.
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, attn_drop_rate, rates[i], drop_rate) for i in range(depth)])
        self.pos_drop = nn.Dropout(drop_rate)
        # With mean pooling the final LayerNorm moves after the pool (timm's fc_norm).
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's default init: trunc-normal(0.02) Linear weights and pos_embed, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally excluded from weight decay (read by timm.optim)."""
        return {"pos_embed", "cls_token"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups by depth (embeddings, each block, final norm), read by timm.optim's
        layer-wise lr decay: a block's lr is scaled by decay^(depth - its index)."""
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed",
            "blocks": r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Install a new zero-initialised head (paper §3.2: fine-tuning replaces the prediction head)."""
        self.num_classes = num_classes
        if num_classes > 0:
            ref = self.pos_embed
            self.head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()
        if dataclasses.is_dataclass(self.config):
            self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, prefix + patches, D)."""
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.pos_drop(x + self.pos_embed)
        return self.norm(self.blocks(x))

    def encode_patches(self, patches: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embeddings (B, N, D), possibly altered (masked patch prediction), -> normalised tokens.

        Each patch gets the position embedding of its grid cell; with `keep` (B, K) patch indices only
        those patches enter the encoder (MAE), the class token always does. With every patch in grid
        order this is forward_features on patch_embed's output.
        """
        prefix = self.num_prefix_tokens
        x = patches + self.pos_embed[:, prefix:]
        if keep is not None:
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        if self.cls_token is not None:
            cls = (self.cls_token + self.pos_embed[:, :prefix]).expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1)
        return self.norm(self.blocks(self.pos_drop(x)))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens -> one vector per image: the class token, or the mean of the patch tokens."""
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
