"""ModelConfig: everything needed to rebuild a model, validated once with user-facing errors."""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any

from vitcli.errors import VitError, did_you_mean
from vitcli.models.layers import ACT_LAYERS, MLP_LAYERS
from vitcli.models.vit import GLOBAL_POOLS

HYBRID_STRIDE = 16  # the R50 stem + stages (3, 4, 9) downsample by 16: the hybrid's effective patch size


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A model's resolved configuration; saved with checkpoints so `create_model(config)` rebuilds it.

    For the hybrid, `patch_size` is the effective patch on the image (16); the transformer itself sees
    1x1 patches of the ResNet feature map.
    """

    name: str
    img_size: tuple[int, int] = (224, 224)
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    global_pool: str = "token"
    class_token: bool = True
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0
    # The successors' additions (models/vit.py's table says who uses which); defaults are the paper's.
    reg_tokens: int = 0
    no_embed_class: bool = False
    distilled: bool = False
    init_values: float | None = None
    pre_norm: bool = False
    fc_norm: bool | None = None
    norm_eps: float = 1e-6
    act_layer: str = "gelu"
    mlp_layer: str = "mlp"
    qk_norm: bool = False
    # Rotary-embedding ViTs (arch "eva": EVA-02, DINOv3; models/eva.py says what each does)
    rope_type: str = "cat"
    rope_temperature: float = 10000.0
    rope_ref_grid: tuple[int, int] | None = None
    rope_rotate_half: bool = False
    abs_pos: bool = True
    qkv_fused: bool = True
    scale_mlp: bool = False
    scale_attn_inner: bool = False
    hybrid: bool = False  # fixed by the registered name, never overridden
    arch: str = "vit"  # "vit" (models/vit.py) or "eva" (models/eva.py); fixed by the registered name

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def grid_size(self) -> tuple[int, int]:
        # The hybrid's 'SAME'-padded strides round up; plain patches must divide the image exactly.
        if self.hybrid:
            return tuple(math.ceil(s / HYBRID_STRIDE) for s in self.img_size)  # type: ignore[return-value]
        return self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens in front of the patches: class, distillation, registers."""
        return int(self.class_token) + int(self.distilled) + self.reg_tokens

    @property
    def pos_prefix_tokens(self) -> int:
        """Prefix tokens that have a slot in the position table (none when no_embed_class)."""
        return 0 if self.no_embed_class else self.num_prefix_tokens

    @property
    def seq_len(self) -> int:
        return self.grid_size[0] * self.grid_size[1] + self.num_prefix_tokens

    def to_dict(self) -> dict[str, Any]:
        """Plain types only (img_size as a list), ready for JSON / YAML / safetensors metadata."""
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        if self.rope_ref_grid is not None:
            d["rope_ref_grid"] = list(self.rope_ref_grid)
        return d

    def vit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for VisionTransformer (the rotary settings and name, hybrid, arch left out)."""
        d = dataclasses.asdict(self)
        for key in ("name", "hybrid", "arch", *EVA_ONLY):
            del d[key]
        return d

    def eva_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for Eva (no distillation token there)."""
        d = dataclasses.asdict(self)
        for key in ("name", "hybrid", "arch", "distilled"):
            del d[key]
        return d


# Settings only the rotary-embedding ViTs (arch "eva") have.
EVA_ONLY = ("rope_type", "rope_temperature", "rope_ref_grid", "rope_rotate_half", "abs_pos", "qkv_fused",
            "scale_mlp", "scale_attn_inner")
ROPE_TYPES = ("cat", "dinov3")


def _int(key: str, v: Any, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < minimum:
        raise VitError(f"model.{key} must be an integer >= {minimum}, got {v!r}")
    return int(v)


def _rate(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.0 <= v < 1.0:
        raise VitError(f"model.{key} must be a number in [0, 1), got {v!r}")
    return float(v)


def _bool(key: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise VitError(f"model.{key} must be true or false, got {v!r}")
    return v


def _img_size(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return _int("img_size", v[0], 1), _int("img_size", v[1], 1)
    if isinstance(v, (list, tuple)):
        raise VitError(f"model.img_size must be an integer or [height, width], got {v!r}")
    side = _int("img_size", v, 1)
    return side, side


def _global_pool(v: Any) -> str:
    if v not in GLOBAL_POOLS:
        raise VitError(f"model.global_pool must be one of {', '.join(GLOBAL_POOLS)}, got {v!r}")
    return v


def _choice(key: str, choices) -> Any:
    def check(v: Any) -> str:
        if v not in choices:
            raise VitError(f"model.{key} must be one of {', '.join(choices)}, got {v!r}")
        return v
    return check


def _optional(check) -> Any:
    return lambda v: None if v is None else check(v)


def _positive(key: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or v <= 0:
        raise VitError(f"model.{key} must be a positive number, got {v!r}")
    return float(v)


def _grid(key: str, v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return _int(key, v[0], 1), _int(key, v[1], 1)
    raise VitError(f"model.{key} must be [rows, columns], got {v!r}")


def _mlp_ratio(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or v <= 0:
        raise VitError(f"model.mlp_ratio must be a positive number, got {v!r}")
    return float(v)


# Override key -> normaliser raising VitError on a bad value.
OVERRIDES = {
    "num_classes": lambda v: _int("num_classes", v, 0),
    "img_size": _img_size,
    "patch_size": lambda v: _int("patch_size", v, 1),
    "in_chans": lambda v: _int("in_chans", v, 1),
    "embed_dim": lambda v: _int("embed_dim", v, 1),
    "depth": lambda v: _int("depth", v, 1),
    "num_heads": lambda v: _int("num_heads", v, 1),
    "mlp_ratio": _mlp_ratio,
    "qkv_bias": lambda v: _bool("qkv_bias", v),
    "global_pool": _global_pool,
    "class_token": lambda v: _bool("class_token", v),
    "drop_rate": lambda v: _rate("drop_rate", v),
    "attn_drop_rate": lambda v: _rate("attn_drop_rate", v),
    "drop_path_rate": lambda v: _rate("drop_path_rate", v),
    "reg_tokens": lambda v: _int("reg_tokens", v, 0),
    "no_embed_class": lambda v: _bool("no_embed_class", v),
    "distilled": lambda v: _bool("distilled", v),
    "init_values": _optional(lambda v: _positive("init_values", v)),
    "pre_norm": lambda v: _bool("pre_norm", v),
    "fc_norm": _optional(lambda v: _bool("fc_norm", v)),
    "norm_eps": lambda v: _positive("norm_eps", v),
    "act_layer": _choice("act_layer", tuple(ACT_LAYERS)),
    "mlp_layer": _choice("mlp_layer", MLP_LAYERS),
    "qk_norm": lambda v: _bool("qk_norm", v),
    "rope_type": _choice("rope_type", ROPE_TYPES),
    "rope_temperature": lambda v: _positive("rope_temperature", v),
    "rope_ref_grid": _optional(lambda v: _grid("rope_ref_grid", v)),
    "rope_rotate_half": lambda v: _bool("rope_rotate_half", v),
    "abs_pos": lambda v: _bool("abs_pos", v),
    "qkv_fused": lambda v: _bool("qkv_fused", v),
    "scale_mlp": lambda v: _bool("scale_mlp", v),
    "scale_attn_inner": lambda v: _bool("scale_attn_inner", v),
}


def apply_overrides(base: ModelConfig, overrides: Mapping[str, Any]) -> ModelConfig:
    """base with overrides applied; every key and value checked, then the combination."""
    clean = {}
    for key, value in overrides.items():
        if key not in OVERRIDES:
            raise VitError(f"unknown model setting {key!r}.{did_you_mean(key, OVERRIDES)} "
                           f"Valid settings: {', '.join(sorted(OVERRIDES))}.")
        clean[key] = OVERRIDES[key](value)
    cfg = dataclasses.replace(base, **clean)
    check(cfg)
    return cfg


def check(cfg: ModelConfig) -> None:
    """Cross-field rules; raises VitError saying what to change."""
    if cfg.embed_dim % cfg.num_heads:
        raise VitError(f"model.embed_dim {cfg.embed_dim} must be divisible by model.num_heads {cfg.num_heads}")
    if cfg.global_pool == "token" and not cfg.class_token:
        raise VitError("model.class_token=false needs model.global_pool='avg' (there is no token to pool)")
    plain = ModelConfig(name="")
    if cfg.arch == "vit" and any(getattr(cfg, k) != getattr(plain, k) for k in EVA_ONLY):
        changed = [k for k in EVA_ONLY if getattr(cfg, k) != getattr(plain, k)]
        raise VitError(f"model.{changed[0]} is a setting of the rotary-embedding ViTs (EVA-02, DINOv3: eva02_*, "
                       f"vit_*_dinov3), not of {cfg.name}")
    if cfg.arch == "eva" and (cfg.distilled or cfg.mlp_layer == "swiglu_packed" and cfg.scale_mlp):
        raise VitError(f"{cfg.name} (a rotary-embedding ViT) takes no distillation token, and its packed SwiGLU "
                       "no inner norm")
    if cfg.mlp_layer == "swiglu" and cfg.arch != "eva":
        raise VitError("model.mlp_layer=swiglu (separate gate weights) is the EVA-02 MLP; VisionTransformer models "
                       "take mlp or swiglu_packed")
    if cfg.distilled and (cfg.global_pool != "token" or cfg.reg_tokens):
        raise VitError("model.distilled (DeiT's distillation token) needs model.global_pool='token' and no "
                       "model.reg_tokens: the two heads read the class and distillation tokens")
    if cfg.mlp_layer == "swiglu_packed" and cfg.arch == "vit" and cfg.mlp_dim % 2:
        raise VitError(f"a gated MLP needs an even hidden width, got {cfg.mlp_dim} (model.embed_dim x "
                       "model.mlp_ratio); adjust model.mlp_ratio")
    if cfg.hybrid:
        if cfg.patch_size != HYBRID_STRIDE:
            raise VitError(f"{cfg.name} is a hybrid: its patch size is fixed at {HYBRID_STRIDE} by the ResNet "
                           "stride; remove the patch_size setting")
    elif any(s % cfg.patch_size for s in cfg.img_size):
        h, w = cfg.img_size
        raise VitError(f"model.img_size {h}x{w} is not a multiple of the patch size {cfg.patch_size}; "
                       f"choose sides divisible by {cfg.patch_size}")


def input_size(model: Any) -> tuple[int, int]:
    """(height, width) of the images a model built by create_model takes."""
    size = getattr(getattr(model, "config", None), "img_size", None) or model.patch_embed.img_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def input_channels(model: Any) -> int:
    return int(getattr(getattr(model, "config", None), "in_chans", 3))
