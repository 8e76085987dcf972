"""The ViTs with 2D rotary position embeddings: EVA-02 (Fang et al., 2024) and DINOv3 (Simeoni et al.,
2025), with timm's `Eva` names and shapes, so their state dicts load strictly.

What differs from models/vit.py: each block rotates the patch tokens' queries and keys by their grid
position (RoPE; prefix tokens are left as they are); the fused qkv projection has biases on q and v only
(or q, k, v are separate projections); LayerScale is `gamma_1` / `gamma_2`; EVA-02's MLPs are SwiGLU,
with a LayerNorm inside for the base and large models (`scale_mlp`) and one inside attention for its CLIP
towers (`scale_attn_inner`). DINOv3 has registers and no learned position table at all.

The rotary tables themselves come from timm.layers (`create_rope_embed`), the implementation both
families' timm ports were checked against; they are buffers, not weights, so a new input size only
rebuilds them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitcli.errors import VitError
from vitcli.models.intermediates import Indices, forward_intermediates, masked_patches
from vitcli.models.layers import AttentionPoolLatent, DropPath, PatchEmbed, init_linears, make_mlp
from vitcli.models.posemb import resample_pos_embed

ROPE_TYPES = ("cat", "dinov3")  # EVA-02's axial RoPE (scaled to a reference grid), DINOv3's normalised-coordinate RoPE


class EvaAttention(nn.Module):
    """Self-attention whose patch queries and keys are rotated by their grid position.

    Args:
        dim: token width.
        num_heads: heads.
        qkv_bias: biases on q and v (never k, as EVA).
        qkv_fused: one qkv matrix (q_bias, v_bias beside it) or separate q_proj / k_proj / v_proj.
        num_prefix_tokens: leading tokens (class, registers) that get no rotation.
        qk_norm: LayerNorm over each head's queries and keys.
        scale_norm: a LayerNorm on the attention output before the projection (EVA-02 CLIP).
        rotate_half: the rotation pairs channel i with i + d/2 (DINOv3) instead of neighbours (EVA-02).
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qkv_fused: bool = True,
                 num_prefix_tokens: int = 1, attn_drop: float = 0.0, proj_drop: float = 0.0, qk_norm: bool = False,
                 scale_norm: bool = False, rotate_half: bool = False, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.rotate_half = rotate_half
        self.attn_drop = attn_drop
        if qkv_fused:
            self.qkv = nn.Linear(dim, dim * 3, bias=False)
            self.q_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
            self.register_buffer("k_bias", torch.zeros(dim), persistent=False)
            self.v_bias = nn.Parameter(torch.zeros(dim)) if qkv_bias else None
        else:
            self.qkv = None
            self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
            self.k_proj = nn.Linear(dim, dim, bias=False)
            self.v_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.norm = nn.LayerNorm(dim, eps=norm_eps) if scale_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: torch.Tensor, rope: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values per head, (B, heads, N, head_dim), rotations applied."""
        from timm.layers import apply_rot_embed_cat

        b, n, _ = x.shape
        if self.qkv is not None:
            bias = torch.cat((self.q_bias, self.k_bias, self.v_bias)) if self.q_bias is not None else None
            q, k, v = F.linear(x, self.qkv.weight, bias).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = (proj(x).reshape(b, n, self.num_heads, -1).transpose(1, 2)
                       for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            p = self.num_prefix_tokens
            q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=self.rotate_half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=self.rotate_half)], dim=2).type_as(v)
        return q, k, v

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv_heads(x, rope=rope)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(self.norm(x.transpose(1, 2).reshape(b, n, c))))


class EvaBlock(nn.Module):
    """Pre-LN block with rotary attention and optional LayerScale (`gamma_1`, `gamma_2`)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, qkv_bias: bool, qkv_fused: bool,
                 num_prefix_tokens: int, mlp_layer: str, scale_mlp: bool, scale_attn_inner: bool, qk_norm: bool,
                 rotate_half: bool, init_values: float | None, act: str, norm_eps: float, drop: float,
                 attn_drop: float, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = EvaAttention(dim, num_heads, qkv_bias, qkv_fused, num_prefix_tokens, attn_drop, drop, qk_norm,
                                 scale_attn_inner, rotate_half, norm_eps)
        self.gamma_1 = nn.Parameter(torch.full((dim,), float(init_values))) if init_values is not None else None
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        hidden = int(dim * mlp_ratio)
        # timm's Eva gives a packed SwiGLU twice the width it names (value and gate side by side)
        self.mlp = make_mlp(mlp_layer, dim, hidden * 2 if mlp_layer == "swiglu_packed" else hidden, drop,
                            "silu" if mlp_layer != "mlp" else act, norm=scale_mlp, norm_eps=norm_eps)
        self.gamma_2 = nn.Parameter(torch.full((dim,), float(init_values))) if init_values is not None else None
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        y = self.attn(self.norm1(x), rope=rope)
        x = x + self.drop_path1(y if self.gamma_1 is None else self.gamma_1 * y)
        y = self.mlp(self.norm2(x))
        return x + self.drop_path2(y if self.gamma_2 is None else self.gamma_2 * y)


class Eva(nn.Module):
    """A ViT with rotary position embeddings (timm's `Eva` for EVA-02 and DINOv3).

    Args (beyond VisionTransformer's):
        rope_type: "cat" (EVA-02) or "dinov3".
        rope_temperature: frequency base (10000 for EVA-02, 100 for DINOv3).
        rope_ref_grid: the grid EVA-02's rotations were trained at (16x16 at 224/14); other grids scale
            their coordinates to it. None: the model's own grid.
        rope_rotate_half: pair channel i with i + d/2 (DINOv3) instead of neighbours.
        abs_pos: also a learned position table (EVA-02: yes; DINOv3: no).
        qkv_fused: one qkv matrix with q and v biases, or separate projections.
        scale_mlp / scale_attn_inner: EVA-02's inner LayerNorms.
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 16, in_chans: int = 3,
                 num_classes: int = 1000, global_pool: str = "avg", embed_dim: int = 768, depth: int = 12,
                 num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True, class_token: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 reg_tokens: int = 0, no_embed_class: bool = False, init_values: float | None = None,
                 pre_norm: bool = False, fc_norm: bool | None = None, norm_eps: float = 1e-6,
                 act_layer: str = "gelu", mlp_layer: str = "mlp", qk_norm: bool = False, rope_type: str = "cat",
                 rope_temperature: float = 10000.0, rope_ref_grid: Sequence[int] | None = None,
                 rope_rotate_half: bool = False, abs_pos: bool = True, qkv_fused: bool = True,
                 scale_mlp: bool = False, scale_attn_inner: bool = False) -> None:
        super().__init__()
        if global_pool == "token" and not class_token:
            raise VitError("global_pool='token' needs the class token")
        if rope_type not in ROPE_TYPES:
            raise VitError(f"rope_type must be one of {', '.join(ROPE_TYPES)}, got {rope_type!r}")
        self.config: Any = None
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.num_heads = num_heads
        self.num_reg_tokens = reg_tokens
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.no_embed_class = no_embed_class
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=not pre_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        table = self.patch_embed.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.zeros(1, table, embed_dim)) if abs_pos else None
        self.pos_drop = nn.Dropout(drop_rate)
        self.rope_settings = dict(rope_type=rope_type, temperature=rope_temperature, rotate_half=rope_rotate_half,
                                  ref_grid=tuple(rope_ref_grid) if rope_ref_grid else None)
        self.rope = self._make_rope(self.patch_embed.grid_size)
        self._other_ropes: dict[tuple, torch.Tensor] = {}  # rotary tables of other grids (rope_at), not state
        self.norm_pre = nn.LayerNorm(embed_dim, eps=norm_eps) if pre_norm else nn.Identity()
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.ModuleList([
            EvaBlock(embed_dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, qkv_fused=qkv_fused,
                     num_prefix_tokens=self.num_prefix_tokens, mlp_layer=mlp_layer, scale_mlp=scale_mlp,
                     scale_attn_inner=scale_attn_inner, qk_norm=qk_norm, rotate_half=rope_rotate_half,
                     init_values=init_values, act=act_layer, norm_eps=norm_eps, drop=drop_rate,
                     attn_drop=attn_drop_rate, drop_path=rates[i])
            for i in range(depth)])
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=norm_eps)
        self.attn_pool = AttentionPoolLatent(embed_dim, num_heads, mlp_ratio, norm_eps=norm_eps) \
            if global_pool == "map" else None
        self.fc_norm = nn.LayerNorm(embed_dim, eps=norm_eps) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    def _make_rope(self, grid: tuple[int, int]) -> nn.Module:
        from timm.layers import create_rope_embed

        s = self.rope_settings
        kw: dict[str, Any] = dict(feat_shape=list(grid), temperature=s["temperature"], rotate_half=s["rotate_half"])
        if s["rope_type"] == "cat":  # EVA-02: coordinates in patches, scaled to the reference grid
            kw.update(in_pixels=False, ref_feat_shape=s["ref_grid"])
        return create_rope_embed(rope_type=s["rope_type"], dim=self.embed_dim, num_heads=self.num_heads, **kw)

    @torch.no_grad()
    def init_non_persistent_buffers(self) -> None:
        """Refill what is not in a state dict (the rotary tables, the zero key bias), e.g. after building on
        the meta device and `to_empty`."""
        device = self.patch_embed.proj.weight.device
        self.rope = self._make_rope(self.patch_embed.grid_size).to(device)
        for block in self.blocks:
            if block.attn.qkv is not None:
                block.attn.k_bias.zero_()

    @torch.no_grad()
    def init_weights(self) -> None:
        """timm's init: trunc-normal(0.02) Linear weights and tables, zero biases."""
        if self.pos_embed is not None:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.reg_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)
        init_linears(self)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "reg_token"}

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^cls_token|^reg_token|^pos_embed|^patch_embed|^norm_pre",
                "blocks": r"^blocks\.(\d+)" if coarse else [(r"^blocks\.(\d+)", None), (r"^norm", (99999,))]}

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new zero-initialised head (paper §3.2)."""
        self.num_classes = num_classes
        ref = self.patch_embed.proj.weight
        self.head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0 \
            else nn.Identity()
        if num_classes > 0:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        if dataclasses.is_dataclass(self.config):
            self.config = dataclasses.replace(self.config, num_classes=num_classes)

    def embed_tokens(self, patches: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Patch embeddings -> prefix tokens in front, the learned table (resampled to `grid` where it
        differs from the model's) added where there is one."""
        pos_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        pos_embed = self.pos_embed
        if pos_embed is not None and grid is not None and tuple(grid) != tuple(self.patch_embed.grid_size):
            pos_embed = resample_pos_embed(pos_embed, grid, self.patch_embed.grid_size, num_prefix_tokens=pos_prefix)
        x = patches if pos_embed is None else patches + pos_embed[:, pos_prefix:]
        tokens = [t for t in (self.cls_token, self.reg_token) if t is not None]
        if tokens:
            prefix = torch.cat(tokens, dim=1)
            if pos_embed is not None and pos_prefix:
                prefix = prefix + pos_embed[:, :pos_prefix]
            x = torch.cat([prefix.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x)

    def encoder_input(self, x: torch.Tensor, mask: torch.Tensor | None = None,
                      mask_token: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple[int, int], dict]:
        """Images of any size the patch size divides -> (the first block's input, the patch grid, the
        rotary table for that grid, which every block takes). `mask` (B, N): those patches' embeddings are
        replaced by `mask_token` (D,) first (iBOT)."""
        grid = self.patch_embed.grid_for(x.shape[-2:])
        patches = masked_patches(self.patch_embed(x, any_size=True), mask, mask_token)
        tokens = self.norm_pre(self.embed_tokens(patches, grid))
        return tokens, grid, {"rope": self.rope_at(grid)}

    def rope_at(self, grid: tuple[int, int]) -> torch.Tensor:
        """The rotary table for a patch grid; other grids than the model's are built once and kept."""
        if tuple(grid) == tuple(self.patch_embed.grid_size):
            return self.rope.get_embed()
        ref = self.patch_embed.proj.weight
        key = (tuple(grid), ref.device)
        if key not in self._other_ropes:
            self._other_ropes[key] = self._make_rope(tuple(grid)).to(ref.device).get_embed()
        return self._other_ropes[key]

    def forward_intermediates(self, x: torch.Tensor, indices: Indices = None, **kwargs):
        """timm's forward_intermediates (models/intermediates.py): patch grids after the chosen blocks."""
        return forward_intermediates(self, x, indices, **kwargs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self.embed_tokens(self.patch_embed(x)))
        rope = self.rope.get_embed()
        for block in self.blocks:
            x = block(x, rope=rope)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.attn_pool is not None:
            return self.attn_pool(x)  # timm's Eva pools over every token, prefix included
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
