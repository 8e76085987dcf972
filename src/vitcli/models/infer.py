"""The architecture a state dict in vitcli (= timm) names was made for, and the registered model that
builds it, so a bare file loads without naming its model.

Nothing in the weights says how many attention heads there are, which activation the MLP uses, or the
LayerNorm epsilon: hints (a config beside the file, a timm name) give them when they can, then a
registered model of the same shape, then stated rules.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

from vitcli.errors import VitError, few_keys

HEAD_DIM = 64  # ViT-Ti/S/B/L all use 64-wide heads; the fallback when nothing says how many heads
HYBRID_LAYERS = (3, 4, 9)  # the only ResNet stage layout the registry builds (R50+ViT-B/16)

# timm features vitcli does not implement: key pattern -> what it is. (RoPE-ViT's qkv bias on keys is
# checked in `_check_eva`, where a rotary model is recognised.)
UNSUPPORTED = {
    r"^rope\.freqs$": "learned per-layer rotary frequencies (RoPE-Mixed, timm's vit_*_rope_mixed_*)",
    r"\.mlp\.(w12|w3)\.": "a gated MLP in another layout (w12 / w3)",
    r"^attn_pool\.(pos_embed|k_norm|q_norm)": "an attention-pool head with its own position embedding or qk-norm",
    r"^patch_embed\.norm\.": "a normalised patch embedding",
}
# Keys only a rotary-embedding ViT (timm's Eva class: EVA-02, DINOv3) has.
EVA_MARKERS = (r"^blocks\.0\.gamma_1$", r"^blocks\.0\.attn\.[qv]_bias$", r"^blocks\.0\.attn\.q_proj\.weight$")
# Keys a rotary model has that VisionTransformer does not: refused there, read by the Eva class.
VIT_UNSUPPORTED = {
    r"\.attn\.norm\.": "a normalisation inside attention (scale_attn_norm)",
    r"\.mlp\.norm\.": "a normalisation inside the MLP",
    r"\.mlp\.fc1_[gx]\.": "a gated MLP with separate gate weights (timm's SwiGLU) in a VisionTransformer",
}
SUPPORTED = ("the paper's ViT, AugReg, DeiT (also distilled), DeiT III, DINOv2 (also with registers), SigLIP / "
             "SigLIP 2, CLIP towers, EVA-02 and DINOv3")


def is_eva(state_dict: Mapping[str, Any]) -> bool:
    """Whether a timm-named state dict is of the Eva class (rotary embeddings): LayerScale as gamma_1, q/v
    biases beside a bias-free qkv, separate q/k/v or SwiGLU gates, or no position table at all."""
    keys = list(state_dict)
    return any(re.search(p, k) for p in EVA_MARKERS for k in keys) or (
        "pos_embed" not in state_dict and "patch_embed.proj.weight" in state_dict) or (
        "blocks.0.mlp.fc1_g.weight" in state_dict and "blocks.0.attn.qkv.bias" not in state_dict)


def check_supported(state_dict: Mapping[str, Any]) -> None:
    """VitError when a timm-named state dict uses a feature vitcli lacks, or is not a ViT."""
    eva = is_eva(state_dict)
    for pattern, what in {**UNSUPPORTED, **({} if eva else VIT_UNSUPPORTED)}.items():
        hits = [k for k in state_dict if re.search(pattern, k)]
        if hits:
            raise VitError(f"this checkpoint uses {what} ({few_keys(hits)}), which vitcli does not implement. "
                           f"vitcli reads {SUPPORTED}")
    if eva and "blocks.0.attn.qkv.bias" in state_dict:
        raise VitError("this checkpoint is a RoPE-ViT (Heo et al., 2024; timm's vit_*_rope_*): rotary embeddings "
                       "with a bias on the keys too, which vitcli does not implement. vitcli reads " + SUPPORTED)
    if "patch_embed.proj.weight" not in state_dict or "blocks.0.norm1.weight" not in state_dict:
        raise VitError(f"not a Vision Transformer state dict (no patch_embed.proj.weight / blocks.0.*; first "
                       f"keys: {few_keys(state_dict)})")


def hybrid_layers(state_dict: Mapping[str, Any]) -> tuple[int, ...]:
    """Blocks per ResNet stage of a hybrid's backbone ((3, 4, 9) for R50+ViT-B/16); () if not a hybrid."""
    blocks: dict[int, set[int]] = {}
    for k in state_dict:
        m = re.match(r"patch_embed\.backbone\.stages\.(\d+)\.blocks\.(\d+)\.", k)
        if m:
            blocks.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return tuple(len(blocks[s]) for s in sorted(blocks))


def infer_model_args(state_dict: Mapping[str, torch.Tensor], *, num_heads: int | None = None,
                     img_size: int | tuple[int, int] | None = None) -> dict[str, Any]:
    """The architecture a vitcli/timm-named state dict was made for.

    Returns embed_dim, depth, num_heads, mlp_ratio, patch_size, img_size [h, w], in_chans, num_classes,
    class_token, global_pool, qkv_bias, hybrid, and the successors' additions the weights show
    (reg_tokens, distilled, no_embed_class, init_values, pre_norm, fc_norm, mlp_layer, qk_norm).
    Nothing in the weights says how many heads attention has, nor the activation or the LayerNorm
    epsilon: `num_heads` wins when given, else a registered model of the same shape gives it, else the
    standard head width of 64 does; `closest_model` fills in the other two.

    Args:
        state_dict: vitcli (= timm) names, e.g. from `from_hf_transformers` or `from_google_npz`.
        num_heads: attention heads when known (HF config, .npz kernel shape, user).
        img_size: the training resolution when the position grid is not square.
    """
    check_supported(state_dict)
    sd = state_dict
    layers = hybrid_layers(sd)
    hybrid = bool(layers)
    if hybrid and layers != HYBRID_LAYERS:
        raise VitError(f"hybrid checkpoint with ResNet stages {layers}; vitcli builds the R50 hybrid "
                       f"{HYBRID_LAYERS} (R50+ViT-B/16) only")
    proj = sd["patch_embed.proj.weight"]
    embed_dim = int(proj.shape[0])
    depth = len({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    eva = is_eva(sd)
    mlp_layer, mlp_ratio = _mlp(sd, embed_dim, eva)
    class_token = "cls_token" in sd
    distilled = "dist_token" in sd
    reg_tokens = int(sd["reg_token"].shape[1]) if "reg_token" in sd else 0
    prefix = int(class_token) + int(distilled) + reg_tokens
    if hybrid:
        patch_size, stride = 16, 16
        in_chans = int(sd["patch_embed.backbone.stem.conv.weight"].shape[1])
    else:
        if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
            raise VitError(f"patch_embed.proj.weight has shape {tuple(proj.shape)}; expected a square "
                           "(embed_dim, in_chans, p, p) conv kernel")
        patch_size = stride = int(proj.shape[-1])
        in_chans = int(proj.shape[1])

    if "pos_embed" not in sd:  # rotary embeddings only (DINOv3): the size comes from hints or the registry
        size = None if img_size is None else list(_pair(img_size))
        no_embed_class = False
    else:
        size, no_embed_class = _grid_size(sd["pos_embed"].shape[1], prefix, stride, img_size)

    has_fc_norm = "fc_norm.weight" in sd
    pool = "map" if "attn_pool.latent" in sd else "token" if class_token and not has_fc_norm else "avg"
    args = {
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads or _registered_heads(embed_dim, depth, mlp_ratio, hybrid) or _head_dim_rule(embed_dim),
        "mlp_ratio": mlp_ratio,
        "patch_size": patch_size,
        "img_size": size,
        "in_chans": in_chans,
        "num_classes": int(sd["head.weight"].shape[0]) if "head.weight" in sd else 0,
        "class_token": class_token,
        "global_pool": pool,
        "qkv_bias": "blocks.0.attn.qkv.bias" in sd,
        "hybrid": hybrid,
    }
    # The successors' additions, only where present, so a paper ViT infers exactly as before.
    found = {
        "reg_tokens": reg_tokens,
        "distilled": distilled,
        "no_embed_class": no_embed_class,
        "init_values": _layer_scale(sd),
        "pre_norm": "norm_pre.weight" in sd,
        # timm's default puts the final norm after an average pool; some towers (SigLIP gap) keep it on the tokens
        "fc_norm": False if pool == "avg" and not has_fc_norm else True if pool == "token" and has_fc_norm else None,
        "mlp_layer": mlp_layer,
        "qk_norm": "blocks.0.attn.q_norm.weight" in sd,
    }
    if eva:
        found.update(abs_pos="pos_embed" in sd, qkv_fused="blocks.0.attn.qkv.weight" in sd,
                     scale_mlp="blocks.0.mlp.norm.weight" in sd, scale_attn_inner="blocks.0.attn.norm.weight" in sd)
        args["qkv_bias"] = "blocks.0.attn.q_bias" in sd or "blocks.0.attn.q_proj.bias" in sd
        args["arch"] = "eva"
    plain = _plain()
    args.update({k: v for k, v in found.items() if v != getattr(plain, k)})
    return args


def _pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _grid_size(n_pos: int, prefix: int, stride: int, img_size) -> tuple[list[int], bool]:
    """The image size a position table of n_pos entries was made for, and whether the table lacks the
    prefix tokens' slots (timm's no_embed_class)."""
    if img_size is not None:
        h, w = _pair(img_size)
        gh, gw = math.ceil(h / stride), math.ceil(w / stride)
        if gh * gw not in (n_pos, n_pos - prefix):
            raise VitError(f"img_size {h}x{w} gives a {gh}x{gw} grid, but the position embedding has {n_pos - prefix} "
                           "grid tokens; pass the resolution the checkpoint was trained at")
        return [int(h), int(w)], prefix > 0 and gh * gw == n_pos
    # A table without prefix slots (timm's no_embed_class) is a square; n*n + 1 never is.
    no_embed_class = prefix > 0 and math.isqrt(n_pos) ** 2 == n_pos
    n_grid = n_pos if no_embed_class else n_pos - prefix
    side = math.isqrt(n_grid)
    if side * side != n_grid:
        raise VitError(f"the position embedding has {n_grid} grid tokens, not a square grid; pass the "
                       "checkpoint's img_size")
    return [side * stride, side * stride], no_embed_class


def _mlp(sd: Mapping[str, torch.Tensor], dim: int, eva: bool) -> tuple[str, float]:
    """The MLP kind and its mlp_ratio in the convention of the model class: VisionTransformer counts a
    packed SwiGLU's fc1 whole, Eva one half of it."""
    if "blocks.0.mlp.fc1_g.weight" in sd:
        return "swiglu", sd["blocks.0.mlp.fc1_g.weight"].shape[0] / dim
    fc1, fc2 = sd["blocks.0.mlp.fc1.weight"], sd["blocks.0.mlp.fc2.weight"]
    if fc1.shape[0] == 2 * fc2.shape[1]:  # SwiGLUPacked: fc1 holds value and gate
        return "swiglu_packed", (fc2.shape[1] if eva else fc1.shape[0]) / dim
    return "mlp", fc1.shape[0] / dim


def _layer_scale(sd: Mapping[str, torch.Tensor]) -> float | None:
    """LayerScale's initial value is not in the weights (only where training took it); any positive value
    builds the same model, so the trained mean magnitude stands in."""
    gamma = sd.get("blocks.0.ls1.gamma", sd.get("blocks.0.gamma_1"))
    return None if gamma is None else float(gamma.abs().mean()) or 1e-5


def _head_dim_rule(embed_dim: int) -> int:
    """Heads giving the head width closest to 64 among the divisors of embed_dim."""
    divisors = [h for h in range(1, embed_dim + 1) if embed_dim % h == 0]
    return min(divisors, key=lambda h: (abs(embed_dim / h - HEAD_DIM), h))


def _registered(hybrid: bool, arch: str = "vit"):
    from vitcli.models import list_models
    from vitcli.models.registry import resolve_config

    for name in list_models():
        cfg = resolve_config(name)
        if cfg.hybrid == hybrid and cfg.arch == arch:
            yield cfg


def _registered_heads(embed_dim: int, depth: int, mlp_ratio: float, hybrid: bool) -> int | None:
    for cfg in (*_registered(hybrid), *_registered(hybrid, "eva")):
        if (cfg.embed_dim, cfg.depth) == (embed_dim, depth) and math.isclose(cfg.mlp_ratio, mlp_ratio):
            return cfg.num_heads
    return None


# The create_model settings a checkpoint's metadata records (every one, so it rebuilds the same model).
ARCH_KEYS = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth", "num_heads", "reg_tokens",
             "no_embed_class", "distilled", "init_values", "pre_norm", "fc_norm", "norm_eps", "act_layer",
             "mlp_layer", "qk_norm", "mlp_ratio", "qkv_bias", "class_token", "global_pool",
             "rope_type", "rope_temperature", "rope_ref_grid", "rope_rotate_half", "abs_pos", "qkv_fused",
             "scale_mlp", "scale_attn_inner")

# Architecture settings the weights determine; registered models must agree on these to match exactly.
SHAPE_KEYS = ("embed_dim", "depth", "num_heads", "reg_tokens", "distilled", "pre_norm", "mlp_layer", "qk_norm",
              "abs_pos", "qkv_fused", "scale_mlp", "scale_attn_inner")
# Settings the weights cannot show: taken from the hints, an exact registered match, else these rules.
UNSEEN_KEYS = ("norm_eps", "act_layer", "rope_type", "rope_temperature", "rope_ref_grid", "rope_rotate_half")
EVA02_ROPE = {"rope_type": "cat", "rope_temperature": 10000.0, "rope_ref_grid": (16, 16), "rope_rotate_half": False}
DINOV3_ROPE = {"rope_type": "dinov3", "rope_temperature": 100.0, "rope_ref_grid": None, "rope_rotate_half": True}


def _unseen_defaults(args: Mapping[str, Any]) -> dict[str, Any]:
    """What the weights cannot show, when no registered model matches: CLIP's epsilon for a pre-norm tower
    (1e-5; GELU, as timm's CLIP names), SiLU for a gated MLP, the paper's otherwise; for a rotary model
    DINOv3's rotations when it has no position table (and LayerNorm eps 1e-5), else EVA-02's."""
    out = {"norm_eps": 1e-5 if args.get("pre_norm") else 1e-6,
           "act_layer": "silu" if args.get("mlp_layer") == "swiglu_packed" else "gelu"}
    if args.get("arch") == "eva":
        out.update(EVA02_ROPE if args.get("abs_pos", True) else {**DINOV3_ROPE, "norm_eps": 1e-5})
    else:
        out.update({k: getattr(_plain(), k) for k in UNSEEN_KEYS if k.startswith("rope_")})
    return out


def pooling_of(cfg: Any, args: Mapping[str, Any]) -> dict[str, Any]:
    """cfg's global_pool and fc_norm when they lay out the same weights as `args` (DINOv3 averages tokens
    normalised before the pool, which weights alone cannot tell from class-token pooling); else {}."""
    def layout(pool: str, fc_norm: bool | None) -> tuple[bool, bool]:
        return pool == "map", (pool == "avg" if fc_norm is None else bool(fc_norm))

    same = layout(cfg.global_pool, cfg.fc_norm) == layout(args["global_pool"], args.get("fc_norm"))
    if not same or (cfg.global_pool == "token" and not args.get("class_token", True)):
        return {}
    return {"global_pool": cfg.global_pool, "fc_norm": cfg.fc_norm}


def _plain():
    from vitcli.models.config import ModelConfig

    return ModelConfig(name="")


def closest_model(args: Mapping[str, Any], prefer: str | None = None) -> tuple[str, dict[str, Any], bool]:
    """(registered name, create_model overrides, exact) for inferred args.

    `exact` is True when a registered model has the same width, depth, heads, MLP, patch size and
    family features (registers, distillation token, pre-norm ...); the overrides then only set
    resolution, classes, pooling... and the activation and LayerNorm epsilon come from that model
    unless `args` state them. Otherwise the name is the nearest plain model and the overrides spell out
    the whole architecture. The overrides always carry every architecture setting, so the result
    rebuilds the same model even if registry defaults change. `prefer` names the registered model to take
    among exact matches (the timm name a file came with).
    """
    hybrid, arch = bool(args.get("hybrid")), args.get("arch", "vit")
    plain = _plain()
    full = {k: args.get(k, getattr(plain, k)) for k in ARCH_KEYS if k not in UNSEEN_KEYS}
    candidates = list(_registered(hybrid, arch))
    if not candidates:
        raise VitError("no registered model of this kind (hybrid)" if hybrid else "no registered ViT model")

    def same(cfg) -> bool:
        return (all(getattr(cfg, k) == full[k] for k in SHAPE_KEYS)
                and bool(cfg.init_values) == bool(full["init_values"])
                and math.isclose(cfg.mlp_ratio, full["mlp_ratio"], rel_tol=1e-4)
                and (hybrid or cfg.patch_size == full["patch_size"]))

    exact = [c for c in candidates if same(c)]
    # Among equals prefer the one that also pools and embeds positions alike (DeiT III over ViT-B/16).
    exact.sort(key=lambda c: (c.name != prefer, c.global_pool != full["global_pool"], c.no_embed_class != full["no_embed_class"],
                              c.class_token != full["class_token"], c.name))
    near = exact[0] if exact else min(
        candidates, key=lambda c: (c.patch_size != full["patch_size"], c.abs_pos != full["abs_pos"],
                                   abs(c.embed_dim - full["embed_dim"]), abs(c.depth - full["depth"]), c.name))
    if exact or arch == "eva":  # a rotary family pools as its kin (DINOv3: the average); a ViT keeps its own
        full.update(pooling_of(near, full))
    unseen = {k: getattr(exact[0], k) for k in UNSEEN_KEYS} if exact else _unseen_defaults({**full, "arch": arch})
    overrides = {**full, **unseen, **{k: args[k] for k in UNSEEN_KEYS if k in args}}
    if overrides.get("rope_ref_grid") is not None:
        overrides["rope_ref_grid"] = list(overrides["rope_ref_grid"])
    if overrides["img_size"] is None:
        # rotary embeddings only (DINOv3): no weight depends on the size, so the family's own serves
        overrides["img_size"] = [s * full["patch_size"] // near.patch_size for s in near.img_size]
    return near.name, overrides, bool(exact)


