"""The Vision Transformer of Dosovitskiy et al. (ICLR 2021), §3.1, and the additions of its successors.

Parameter names and shapes equal timm's ``VisionTransformer`` (``VisionTransformerDistilled`` with a
distillation token) for the same configuration, so state dicts move between the two with
``load_state_dict(..., strict=True)`` and no key map. Each addition defaults to the paper:

| setting | used by |
|---|---|
| dist_token (`distilled`) | DeiT distilled: a second token with its own head, logits averaged |
| `init_values` (LayerScale) | DeiT III, DINOv2 |
| `reg_tokens`, `no_embed_class` | DINOv2 with registers; DeiT III (position table without prefix slots) |
| `global_pool="map"` | SigLIP: an attention-pool head |
| `pre_norm`, `norm_eps`, `act_layer` | CLIP towers (LayerNorm before the encoder, eps 1e-5, QuickGELU) |
| `mlp_layer="swiglu_packed"` | DINOv2-g |
| `qk_norm` | query/key LayerNorm |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from vitcli.errors import VitError
from vitcli.models.intermediates import Indices, forward_intermediates, masked_patches
from vitcli.models.layers import AttentionPoolLatent, Block, PatchEmbed, init_linears
from vitcli.models.posemb import resample_pos_embed

GLOBAL_POOLS = ("token", "avg", "map")


class VisionTransformer(nn.Module):
    """ViT: patch embedding + [class] token + learned 1D position embeddings + encoder + head.

    Args:
        img_size: input size, int or (h, w).
        patch_size: patch side (1 for the hybrid, whose patches are CNN feature-map cells).
        in_chans: image channels.
        num_classes: head outputs; 0 gives no head (forward returns pooled features).
        global_pool: 'token' (class token, the paper's default), 'avg' (mean of patch tokens) or 'map'
            (attention pooling over the patch tokens).
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
        reg_tokens: learned register tokens after the class token (Darcet et al., 2024).
        no_embed_class: the position table covers the patches only; prefix tokens get no position.
        distilled: a distillation token after the class token and a second head `head_dist` (DeiT).
        init_values: LayerScale initial value on every residual branch; None for none.
        pre_norm: a LayerNorm on the embedded tokens before the encoder, and no patch bias (CLIP).
        fc_norm: normalise the pooled vector instead of the tokens; None: only for 'avg' pooling.
        norm_eps: LayerNorm epsilon.
        act_layer: MLP activation ('gelu', 'gelu_tanh', 'quick_gelu', 'silu').
        mlp_layer: 'mlp', or 'swiglu_packed' (gated MLP, value and gate in one fc1).
        qk_norm: LayerNorm over each head's queries and keys.
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "token", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, class_token: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 embed_layer: Callable[..., nn.Module] = PatchEmbed, reg_tokens: int = 0,
                 no_embed_class: bool = False, distilled: bool = False, init_values: float | None = None,
                 pre_norm: bool = False, fc_norm: bool | None = None, norm_eps: float = 1e-6,
                 act_layer: str = "gelu", mlp_layer: str = "mlp", qk_norm: bool = False) -> None:
        super().__init__()
        if global_pool not in GLOBAL_POOLS:
            raise VitError(f"global_pool must be one of {', '.join(GLOBAL_POOLS)}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise VitError("global_pool='token' needs the class token; use global_pool='avg' with "
                           "class_token=False")
        if distilled and (global_pool != "token" or reg_tokens):
            raise VitError("a distilled ViT (DeiT) pools the class and distillation tokens: it needs "
                           "global_pool='token' and no register tokens")
        if embed_dim % num_heads:
            raise VitError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.config: Any = None  # set by the registry; a dataclass that rebuilds this model
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + int(distilled) + reg_tokens
        self.no_embed_class = no_embed_class
        self.distilled_training = False  # True: a distilled model returns (class logits, dist logits) in training

        # CLIP's towers have no patch bias: their pre-encoder LayerNorm would cancel it.
        bias = {"bias": False} if pre_norm else {}
        self.patch_embed = embed_layer(img_size=img_size, patch_size=patch_size, in_chans=in_chans,
                                       embed_dim=embed_dim, **bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        # The table has a slot per prefix token (original ViT / timm layout) unless no_embed_class.
        table = self.patch_embed.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, table, embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        # Stochastic depth rises linearly over the blocks; on cpu so it also works under a meta device.
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, attn_drop_rate, rates[i], drop_rate,
                  init_values=init_values, qk_norm=qk_norm, norm_eps=norm_eps, act=act_layer, mlp_layer=mlp_layer)
            for i in range(depth)])
        # With mean pooling the final LayerNorm moves after the pool (timm's fc_norm).
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=norm_eps)
        self.attn_pool = (AttentionPoolLatent(embed_dim, num_heads, mlp_ratio, norm_eps=norm_eps, act=act_layer)
                          if global_pool == "map" else None)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's default init: trunc-normal(0.02) Linear weights and pos_embed, zero biases."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.normal_(token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        init_linears(self)

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally excluded from weight decay (read by timm.optim)."""
        return {"pos_embed", "cls_token", "dist_token", "reg_token"}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups by depth (embeddings, each block, final norm), read by timm.optim's
        layer-wise lr decay: a block's lr is scaled by decay^(depth - its index)."""
        return {
            "stem": r"^cls_token|^dist_token|^reg_token|^pos_embed|^patch_embed|^norm_pre",
            "blocks": r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        }

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Install a new zero-initialised head (paper §3.2: fine-tuning replaces the prediction head);
        a distilled model gets a new `head_dist` too."""
        self.num_classes = num_classes
        ref = self.pos_embed

        def zero_head() -> nn.Module:
            if num_classes <= 0:
                return nn.Identity()
            head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            return head

        self.head = zero_head()
        if self.dist_token is not None:
            self.head_dist = zero_head()
        if dataclasses.is_dataclass(self.config):
            self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def pos_embed_at(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position table for a patch grid: the learned one, resampled where the grid differs."""
        if tuple(grid) == tuple(self.patch_embed.grid_size):
            return self.pos_embed
        prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        return resample_pos_embed(self.pos_embed, grid, self.patch_embed.grid_size, num_prefix_tokens=prefix)

    def embed_tokens(self, patches: torch.Tensor, keep: torch.Tensor | None = None,
                     pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embeddings (B, N, D) -> the encoder's input: position embeddings added, prefix tokens
        (class, distillation, registers) in front. With `keep` (B, K) patch indices only those patches
        stay (MAE); the prefix always does. Equals timm's _pos_embed in both table layouts. `pos_embed`:
        a table for another grid (`pos_embed_at`)."""
        pos_embed = self.pos_embed if pos_embed is None else pos_embed
        pos_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        x = patches + pos_embed[:, pos_prefix:]
        if keep is not None:
            x = torch.gather(x, 1, keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        tokens = [t for t in (self.cls_token, self.dist_token, self.reg_token) if t is not None]
        if tokens:
            prefix = torch.cat(tokens, dim=1)
            if pos_prefix:
                prefix = prefix + pos_embed[:, :pos_prefix]
            x = torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x)

    def encoder_input(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                      mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int], dict]:
        """Images of any size the patch size divides -> (the first block's input, the patch grid, what
        each block takes besides the tokens: nothing here). `mask` (B, N): those patches' embeddings are
        replaced by `mask_token` (D,) before the position embeddings are added (iBOT)."""
        grid = self.patch_embed.grid_for(x.shape[-2:])
        patches = masked_patches(self.patch_embed(x, any_size=True), mask, mask_token)
        return self.norm_pre(self.embed_tokens(patches, pos_embed=self.pos_embed_at(grid))), grid, {}

    def forward_intermediates(self, x: torch.Tensor, indices: Indices = None, **kwargs):
        """timm's forward_intermediates (models/intermediates.py): patch grids after the chosen blocks."""
        return forward_intermediates(self, x, indices, **kwargs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> normalised tokens (B, prefix + patches, D)."""
        return self.encode_patches(self.patch_embed(x))

    def encode_patches(self, patches: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Patch embeddings (B, N, D), possibly altered (masked patch prediction), -> normalised tokens.

        Each patch gets the position embedding of its grid cell; with `keep` (B, K) patch indices only
        those patches enter the encoder (MAE), the prefix tokens always do. With every patch in grid
        order this is forward_features on patch_embed's output.
        """
        return self.norm(self.blocks(self.norm_pre(self.embed_tokens(patches, keep))))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens -> one vector per image: the class token, the mean of the patch tokens, or their
        attention pool. A distilled model's two tokens are averaged (timm's pre_logits)."""
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        if self.global_pool == "map":
            return self.attn_pool(x[:, self.num_prefix_tokens:])
        if self.dist_token is not None:
            return (x[:, 0] + x[:, 1]) / 2
        return x[:, 0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.dist_token is not None and not pre_logits:
            cls, dist = self.head(self.head_drop(x[:, 0])), self.head_dist(self.head_drop(x[:, 1]))
            if self.distilled_training and self.training:
                return cls, dist  # DeiT's hard-distillation training reads both
            return (cls + dist) / 2  # inference and plain fine-tuning: the two heads averaged (DeiT)
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
