"""The building blocks of a Vision Transformer, named and shaped as timm's so state dicts move strictly.

The 2021 paper needs PatchEmbed, Attention, Mlp and Block. Its successors add, each behind a switch
that defaults to the paper: LayerScale (CaiT, DeiT III, DINOv2), query/key normalisation, gated MLPs
(SwiGLU: DINOv2-g, EVA-02), other activations (CLIP's QuickGELU, SigLIP's tanh GELU) and the
attention-pool "MAP" head (big_vision, SigLIP).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vitcli.errors import VitError

# timm: Mlp, SwiGLUPacked (fc1 holds value and gate side by side), SwiGLU (separate fc1_g and fc1_x)
MLP_LAYERS = ("mlp", "swiglu_packed", "swiglu")


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


ACT_LAYERS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "quick_gelu": QuickGELU,
    "silu": nn.SiLU,
}


def make_act(name: str) -> nn.Module:
    if name not in ACT_LAYERS:
        raise VitError(f"activation must be one of {', '.join(ACT_LAYERS)}, got {name!r}")
    return ACT_LAYERS[name]()


@torch.no_grad()
def init_linears(module: nn.Module) -> None:
    """timm's ViT init of every Linear inside `module`: trunc-normal(0.02) weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def to_2tuple(size: int | Sequence[int]) -> tuple[int, int]:
    """(h, w) from an int or a 2-sequence."""
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def check_input_size(x: torch.Tensor, img_size: tuple[int, int] | None, in_chans: int) -> None:
    """Raise VitError when a batch does not have the shape the model was built for (img_size None: any size)."""
    expected = f"(batch, {in_chans}, {img_size[0]}, {img_size[1]})" if img_size else f"(batch, {in_chans}, H, W)"
    if x.ndim != 4:
        raise VitError(f"expected a batch of images shaped {expected}, got shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise VitError(f"expected images shaped {expected}, got {tuple(x.shape)}; build the model with "
                       f"in_chans={x.shape[1]} or convert the images")
    if img_size is not None and tuple(x.shape[-2:]) != img_size:
        h, w = x.shape[-2:]
        raise VitError(
            f"expected {img_size[0]}x{img_size[1]} input images, got {h}x{w}; build the model with "
            f"img_size=({h}, {w}) (recipe: model.img_size) or resize the inputs")


def grid_of(size: Sequence[int], stride: Sequence[int]) -> tuple[int, int]:
    """(h / sh, w / sw), or one message when the stride does not divide the size."""
    (h, w), (sh, sw) = size, stride
    if h % sh or w % sw:
        raise VitError(f"a {h}x{w} image does not split into {sh}x{sw} patches: pad or resize it to multiples of "
                       f"{sh}x{sw} (dense prediction pads for you; see data.crop_size)")
    return int(h) // sh, int(w) // sw


class PatchEmbed(nn.Module):
    """Split the image into non-overlapping patches and project each to embed_dim (a strided conv).

    Args:
        img_size: input size, int or (h, w); each side must be a multiple of patch_size.
        patch_size: side of the square patches.
        in_chans: image channels.
        embed_dim: token width.
        bias: bias on the projection (CLIP's towers have none).
    """

    def __init__(self, img_size: int | Sequence[int] = 224, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, bias: bool = True) -> None:
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
        self.proj = nn.Conv2d(in_chans, embed_dim, self.patch_size, stride=self.patch_size, bias=bias)

    def grid_for(self, size: Sequence[int]) -> tuple[int, int]:
        """The patch grid of an image of `size` (h, w): any size the patch size divides."""
        return grid_of(size, self.patch_size)

    def forward(self, x: torch.Tensor, any_size: bool = False) -> torch.Tensor:
        """(B, C, H, W) -> (B, h*w, D); any_size: H and W need only be multiples of the patch size."""
        check_input_size(x, None if any_size else self.img_size, self.in_chans)
        if any_size:
            self.grid_for(x.shape[-2:])
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, h*w, C)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection.

    Args:
        dim: token width.
        num_heads: heads; dim must be divisible by it.
        qkv_bias: bias on the qkv projection.
        attn_drop: dropout on attention weights (training only).
        proj_drop: dropout after the output projection (the paper's dropout).
        qk_norm: LayerNorm over each head's queries and keys (ViT-22B, EVA-02).
        norm_eps: epsilon of those LayerNorms.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, qk_norm: bool = False, norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys, values per head, (B, heads, N, head_dim) each, as attention uses them."""
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return self.q_norm(q), self.k_norm(k), v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv_heads(x)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Mlp(nn.Module):
    """Two dense layers with an activation (GELU in the paper) between them.

    Args:
        dim: input and output width.
        hidden_dim: inner width (4 x dim in the paper).
        drop: dropout after each dense layer (the paper's dropout).
        act: activation name (ACT_LAYERS).
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, act: str = "gelu", norm: bool = False,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = make_act(act)
        self.drop = nn.Dropout(drop)
        self.norm = nn.LayerNorm(hidden_dim, eps=norm_eps) if norm else nn.Identity()  # EVA-02's scale_mlp
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.norm(self.drop(self.act(self.fc1(x))))))


class PackedGluMlp(nn.Module):
    """Gated MLP with value and gate in one fc1 (timm's SwiGLUPacked): act(first half) * second half.

    Args:
        dim: input and output width.
        hidden_dim: width of fc1's output, both halves together (8192 for DINOv2-g's 4096 gate).
        drop: dropout after the gating and after fc2.
        act: activation of the gate (silu: SwiGLU).
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, act: str = "silu") -> None:
        super().__init__()
        if hidden_dim % 2:
            raise VitError(f"a gated MLP needs an even hidden width, got {hidden_dim}; adjust model.mlp_ratio")
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = make_act(act)
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim // 2, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.fc1(x).chunk(2, dim=-1)
        return self.drop(self.fc2(self.drop(self.act(value) * gate)))


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch (CaiT), initialised small so deep models start near identity."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


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


class SwiGLU(nn.Module):
    """Gated MLP with separate gate and value projections (timm's SwiGLU, EVA-02): act(fc1_g x) * fc1_x x,
    an optional LayerNorm on the product (EVA-02's scale_mlp), then fc2.

    Args:
        dim: input and output width.
        hidden_dim: width of each of fc1_g and fc1_x.
        drop: dropout after the gating and after fc2.
        act: activation of the gate.
        norm: LayerNorm on the gated product.
        norm_eps: its epsilon.
    """

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0, act: str = "silu", norm: bool = False,
                 norm_eps: float = 1e-6) -> None:
        super().__init__()
        self.fc1_g = nn.Linear(dim, hidden_dim)
        self.fc1_x = nn.Linear(dim, hidden_dim)
        self.act = make_act(act)
        self.drop = nn.Dropout(drop)
        self.norm = nn.LayerNorm(hidden_dim, eps=norm_eps) if norm else nn.Identity()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.norm(self.drop(self.act(self.fc1_g(x)) * self.fc1_x(x)))))


def make_mlp(kind: str, dim: int, hidden_dim: int, drop: float, act: str, norm: bool = False,
             norm_eps: float = 1e-6) -> nn.Module:
    """The MLP of a block: `mlp`, `swiglu_packed` (hidden_dim = both halves) or `swiglu` (hidden_dim = each
    gate); `norm` adds EVA-02's LayerNorm before fc2."""
    if kind == "mlp":
        return Mlp(dim, hidden_dim, drop=drop, act=act, norm=norm, norm_eps=norm_eps)
    if kind == "swiglu_packed" and not norm:
        return PackedGluMlp(dim, hidden_dim, drop=drop, act=act)
    if kind == "swiglu":
        return SwiGLU(dim, hidden_dim, drop=drop, act=act, norm=norm, norm_eps=norm_eps)
    raise VitError(f"mlp_layer must be one of {', '.join(MLP_LAYERS)} (swiglu_packed without an inner norm), got {kind!r}")


class Block(nn.Module):
    """Pre-LN transformer encoder block (paper eq. 2-3), with optional LayerScale on each branch.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        qkv_bias: bias on the qkv projection.
        attn_drop: attention-weight dropout.
        drop_path: stochastic depth rate of this block.
        drop: dropout after every dense layer but qkv (the paper's dropout).
        init_values: LayerScale's initial value; None for none (the paper).
        qk_norm: normalise queries and keys per head.
        norm_eps: LayerNorm epsilon (1e-6 as the JAX code; CLIP uses 1e-5).
        act: MLP activation name.
        mlp_layer: "mlp" or "swiglu_packed".
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 attn_drop: float = 0.0, drop_path: float = 0.0, drop: float = 0.0, *,
                 init_values: float | None = None, qk_norm: bool = False, norm_eps: float = 1e-6,
                 act: str = "gelu", mlp_layer: str = "mlp") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
                              qk_norm=qk_norm, norm_eps=norm_eps)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = make_mlp(mlp_layer, dim, int(dim * mlp_ratio), drop, act)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class AttentionPoolLatent(nn.Module):
    """Multihead attention pooling (MAP, big_vision / SigLIP): one learned query attends over the
    tokens, followed by a residual MLP; timm's AttentionPoolLatent with one latent.

    Args:
        dim: token width.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / dim.
        norm_eps: epsilon of the LayerNorm before the MLP.
        act: MLP activation name.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, norm_eps: float = 1e-6,
                 act: str = "gelu") -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.latent = nn.Parameter(torch.zeros(1, 1, dim))
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=act)
        nn.init.trunc_normal_(self.latent, std=dim ** -0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(self.latent.expand(b, -1, -1)).reshape(b, 1, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, c)
        x = self.proj(x)
        x = x + self.mlp(self.norm(x))
        return x[:, 0]
