"""Model registry: canonical short names (vit_b16), aliases (ViT-B/16, vit_base_patch16_384), builders.

Names resolve case-insensitively. An alias may carry default overrides (vit_base_patch16_384 is
vit_b16 with img_size=384); explicit overrides win over them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vitcli.errors import VitError, did_you_mean
from vitcli.io.meta import Preprocessing
from vitcli.models.config import ModelConfig, apply_overrides
from vitcli.models.hybrid import hybrid_vit
from vitcli.models.timm_classifier import (TimmClassifierConfig, create_timm_classifier, is_timm_classifier,
                                           timm_classifier_config)
from vitcli.models.vit import VisionTransformer

Builder = Callable[[ModelConfig], nn.Module]


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A registered model: its default config, how to build it, the aliases that reach it, and the
    preprocessing of its published weights (None: the paper's, mean = std = 0.5)."""

    defaults: ModelConfig
    build: Builder
    aliases: tuple[str, ...] = ()
    preprocess: Preprocessing | None = None


_MODELS: dict[str, ModelSpec] = {}
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {}  # lower-cased alias -> (canonical, overrides)


def build_vit(cfg: ModelConfig) -> VisionTransformer:
    """A plain ViT from its config."""
    return VisionTransformer(**cfg.vit_kwargs())


def build_eva(cfg: ModelConfig) -> nn.Module:
    """A rotary-embedding ViT (EVA-02, DINOv3) from its config."""
    from vitcli.models.eva import Eva

    return Eva(**cfg.eva_kwargs())


def build_r50_hybrid(cfg: ModelConfig, layers: Sequence[int] = (3, 4, 9)) -> VisionTransformer:
    """R50+ViT: the transformer takes 1x1 patches of the ResNet map (cfg.patch_size is the stride, 16)."""
    return hybrid_vit(layers, **{**cfg.vit_kwargs(), "patch_size": 1})


def register_model(name: str, *, build: Builder = build_vit,
                   aliases: Mapping[str, Mapping[str, Any]] | Sequence[str] = (),
                   hybrid: bool = False, arch: str = "vit", preprocess: Preprocessing | None = None,
                   **defaults: Any) -> ModelSpec:
    """Register `name` with default settings (the create_model override keys) and aliases.

    `aliases` is a list of names, or a mapping alias -> default overrides for that alias.
    """
    if name.lower() in _ALIASES:
        raise ValueError(f"model name {name!r} is already registered")
    alias_map = dict(aliases) if isinstance(aliases, Mapping) else {a: {} for a in aliases}
    cfg = apply_overrides(ModelConfig(name=name, hybrid=hybrid, arch=arch), defaults)
    for alias, overrides in alias_map.items():
        apply_overrides(cfg, overrides)  # fail at import time, not when a user picks the alias
        if alias.lower() in _ALIASES:
            raise ValueError(f"alias {alias!r} is already registered")
    spec = ModelSpec(cfg, build, tuple(alias_map), preprocess)
    _MODELS[name] = spec
    _ALIASES[name.lower()] = (name, {})
    for alias, overrides in alias_map.items():
        _ALIASES[alias.lower()] = (name, dict(overrides))
    return spec


def _lookup(name: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(name, str):
        raise VitError(f"model name must be a string, got {name!r}")
    hit = _ALIASES.get(name.strip().lower())
    if hit is None:
        known = list(_MODELS) + [a for spec in _MODELS.values() for a in spec.aliases]
        raise VitError(f"unknown model {name!r}.{did_you_mean(name, known)} "
                       f"Known models: {', '.join(sorted(_MODELS))} (`vit models` lists aliases too).")
    return hit


def resolve_name(name: str) -> str:
    """Canonical name for a canonical name or alias (any case); VitError if unknown."""
    return _lookup(name)[0]


def resolve_config(name: str | ModelConfig | Mapping[str, Any], **overrides: Any) -> ModelConfig | TimmClassifierConfig:
    """The validated config create_model would build. `name` may also be a saved config (dict or
    ModelConfig), whose settings then act as overrides of its registered defaults. `timm:ARCH` is timm's
    classifier of that architecture (models/timm_classifier.py)."""
    if isinstance(name, (ModelConfig, TimmClassifierConfig)):
        name = name.to_dict()
    if isinstance(name, Mapping):
        saved = dict(name)
        saved.pop("hybrid", None)  # fixed by the name
        saved.pop("arch", None)
        if "name" not in saved:
            raise VitError("a model config needs a 'name'")
        name = saved.pop("name")
        overrides = {**saved, **overrides}
    if is_timm_classifier(name):
        return timm_classifier_config(name, **overrides)
    canonical, alias_overrides = _lookup(name)
    return apply_overrides(_MODELS[canonical].defaults, {**alias_overrides, **overrides})


def create_model(name: str | ModelConfig | Mapping[str, Any], **overrides: Any) -> nn.Module:
    """Build a randomly initialised model by name or alias, e.g. create_model("ViT-B/16", num_classes=10).

    The result carries `model.config` (a ModelConfig) so checkpoints can rebuild it.
    """
    cfg = resolve_config(name, **overrides)
    if isinstance(cfg, TimmClassifierConfig):
        return create_timm_classifier(cfg)
    model = _MODELS[cfg.name].build(cfg)
    model.config = cfg
    return model


def aliases(name: str) -> tuple[str, ...]:
    """The aliases a registered model (name or alias) is reachable by."""
    return _MODELS[_lookup(name)[0]].aliases


def preprocessing(name: str) -> Preprocessing | None:
    """The registered preprocessing of a model name or alias (None when unknown or the paper's)."""
    try:
        return _MODELS[_lookup(name)[0]].preprocess
    except VitError:
        return None


def list_models(pattern: str = "*") -> list[str]:
    """Sorted canonical names matching the fnmatch pattern (case-insensitive); aliases are not listed
    (matching them too made '*h*' hit every '..._patch16_...' alias)."""
    return sorted(n for n in _MODELS if fnmatch.fnmatchcase(n.lower(), pattern.lower()))


@functools.lru_cache(maxsize=256)
def _count_params(cfg: ModelConfig) -> int:
    with torch.device("meta"):  # shapes only: counts ViT-H without allocating 2.5 GB
        model = _MODELS[cfg.name].build(cfg)
    return sum(p.numel() for p in model.parameters())


def model_info(name: str, **overrides: Any) -> dict[str, Any]:
    """Facts about a model: name, params, img_size, patch_size, embed_dim, depth, num_heads, mlp_dim,
    hybrid, aliases, num_classes, global_pool, seq_len, family features (prefix tokens, layer scale, ...)
    and the published preprocessing."""
    cfg = resolve_config(name, **overrides)
    if isinstance(cfg, TimmClassifierConfig):
        with torch.device("meta"):
            params = sum(p.numel() for p in create_timm_classifier(cfg).parameters())
        return {"name": cfg.name, "params": params, "img_size": cfg.img_size, "num_classes": cfg.num_classes,
                "hybrid": False, "aliases": [], "features": ["timm classifier"], "preprocess": dataclasses.asdict(Preprocessing())}
    return {
        "name": cfg.name,
        "params": _count_params(cfg),
        "img_size": cfg.img_size,
        "patch_size": cfg.patch_size,
        "embed_dim": cfg.embed_dim,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_dim": cfg.mlp_dim,
        "hybrid": cfg.hybrid,
        "aliases": list(aliases(cfg.name)),
        "num_classes": cfg.num_classes,
        "global_pool": cfg.global_pool,
        "seq_len": cfg.seq_len,
        "prefix_tokens": cfg.num_prefix_tokens,
        "features": features(cfg),
        "preprocess": dataclasses.asdict(_MODELS[cfg.name].preprocess or Preprocessing()),
    }


def features(cfg: ModelConfig) -> list[str]:
    """The successors' additions a config uses, in words (empty for the paper's ViT)."""
    out = []
    if cfg.distilled:
        out.append("distillation token")
    if cfg.reg_tokens:
        out.append(f"{cfg.reg_tokens} registers")
    if cfg.init_values:
        out.append("layer scale")
    if cfg.pre_norm:
        out.append("pre-norm")
    if cfg.global_pool == "map":
        out.append("MAP head")
    if cfg.mlp_layer != "mlp":
        out.append("SwiGLU")
    gate = cfg.mlp_layer != "mlp" and (cfg.arch == "eva" or cfg.act_layer == "silu")  # SwiGLU's own gate is SiLU
    if cfg.act_layer != "gelu" and not gate:
        out.append(cfg.act_layer)
    if cfg.qk_norm:
        out.append("qk-norm")
    if cfg.arch == "eva":
        out.append("RoPE" + ("" if cfg.abs_pos else " only"))
    return out
