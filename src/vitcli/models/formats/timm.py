"""timm checkpoints: vitcli's own names, so reading is unwrapping; and `timm:<name>[.<tag>]` from the
Hugging Face cache.

`timm:<name>` works as on a cluster's compute nodes: the weights file its pretrained_cfg names is
looked up in the Hugging Face cache first; when there, timm builds the model from that file (its
checkpoint filter included) and nothing asks the network. When not cached, an offline machine fails
at once with how to fetch it; a connected one downloads through timm.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from vitcli.errors import VitError, did_you_mean
from vitcli.io.hub import offline_reason
from vitcli.models.formats.common import strip_wrappers

NAME = "timm"
SAFE_ALTERNATIVES = {"pytorch_model.bin": "model.safetensors",
                     "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}


def detect(keys: Iterable[str]) -> bool:
    return any(k == "patch_embed.proj.weight" for k in keys)


def to_vitcli(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same names: every layout timm's VisionTransformer (and VisionTransformerDistilled) writes is
    vitcli's; only DDP / torch.compile prefixes go."""
    return strip_wrappers(state_dict)


def hints(folder: Path) -> dict[str, Any]:
    """Model name, resolution, normalisation and class names from a timm Hub config.json beside the weights."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cfg, dict) or not isinstance(cfg.get("architecture"), str):
        return {}
    out: dict[str, Any] = {"arch": cfg["architecture"]}
    pcfg = cfg.get("pretrained_cfg") or {}
    for key in ("mean", "std", "interpolation", "crop_pct"):
        if key in pcfg:
            out[key] = pcfg[key]
    if isinstance(pcfg.get("input_size"), list) and len(pcfg["input_size"]) == 3:
        out["img_size"] = pcfg["input_size"][1:]
    if isinstance(cfg.get("label_names"), list):
        out["class_names"] = cfg["label_names"]
    args = cfg.get("model_args") if isinstance(cfg.get("model_args"), dict) else {}
    if isinstance(args.get("num_heads"), int):
        out["num_heads"] = args["num_heads"]
    if isinstance(args.get("act_layer"), str):
        out["act_layer"] = args["act_layer"]
    return out


def model_hints(model: torch.nn.Module, name: str) -> dict[str, Any]:
    """What a built timm model says that its weights cannot: heads, LayerNorm epsilon, activation, and its
    pretrained_cfg's preprocessing."""
    out: dict[str, Any] = {"arch": name.split(".")[0]}
    blocks = getattr(model, "blocks", None)
    if blocks is not None and len(blocks) and hasattr(blocks[0], "attn"):
        out["num_heads"] = int(blocks[0].attn.num_heads)
        out["norm_eps"] = float(getattr(blocks[0].norm1, "eps", 1e-6))
        act = type(getattr(blocks[0].mlp, "act", None)).__name__
        approx = getattr(getattr(blocks[0].mlp, "act", None), "approximate", "none")
        out["act_layer"] = {"QuickGELU": "quick_gelu", "SiLU": "silu", "GELUTanh": "gelu_tanh"}.get(
            act, "gelu_tanh" if approx == "tanh" else "gelu")
    pcfg = dict(getattr(model, "pretrained_cfg", {}) or {})
    for key in ("mean", "std", "interpolation", "crop_pct"):
        if key in pcfg:
            out[key] = list(pcfg[key]) if isinstance(pcfg[key], tuple) else pcfg[key]
    if "input_size" in pcfg:
        out["img_size"] = list(pcfg["input_size"][-2:])
    return out


def _pretrained_cfg(name: str):
    import timm
    from timm.models import get_pretrained_cfg

    if not name:
        raise VitError("timm: needs a model name, e.g. timm:vit_base_patch16_224.augreg2_in21k_ft_in1k")
    if not timm.is_model(name):
        arch = name.split(".")[0]
        close = did_you_mean(arch, timm.list_models("*vit*") + timm.list_models("deit*"))
        raise VitError(f"timm has no model {arch!r}.{close}")
    try:
        cfg = get_pretrained_cfg(name, allow_unregistered=False)
    except RuntimeError:
        cfg = None
    if cfg is None:
        tags = timm.list_pretrained(name.split(".")[0] + "*")
        raise VitError(f"timm has no pretrained weights named {name!r}; its tags: {', '.join(tags[:8]) or 'none'}")
    return cfg


def cached_file(repo: str, filename: str) -> Path | None:
    """The file from the Hugging Face cache (the safetensors twin first), or None when not cached."""
    from huggingface_hub import try_to_load_from_cache

    for candidate in (SAFE_ALTERNATIVES.get(filename), filename):
        if candidate:
            hit = try_to_load_from_cache(repo, candidate)
            if isinstance(hit, str):
                return Path(hit)
    return None


def fetch_hint(repo: str, what: str) -> str:
    return (f"On a machine with network access run `hf download {repo}` (or `python -c \"import timm; "
            f"timm.create_model('{what}', pretrained=True)\"`) with the same HF_HOME, or copy its Hugging Face "
            "cache here, then run again")


def load_name(name: str) -> tuple[torch.nn.Module, str]:
    """The timm model `name` with its pretrained weights, and where they came from. Cached weights load
    with no network call; uncached ones on an offline machine raise a VitError saying how to fetch them."""
    import timm

    cfg = _pretrained_cfg(name)
    repo, filename = cfg.hf_hub_id, cfg.hf_hub_filename or "pytorch_model.bin"
    path = cached_file(repo, filename) if repo else None
    try:
        if path is not None:
            # timm reads the cached file and applies its checkpoint filter; no hub call is made
            model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path), "source": ""})
            return model, str(path)
        reason = offline_reason()
        if reason:
            where = f"the Hugging Face cache has no {repo} ({filename})" if repo else "its weights are not on the Hub"
            raise VitError(f"timm:{name}: {where} and this machine is offline ({reason}). {fetch_hint(repo, name)}")
        return timm.create_model(name, pretrained=True), f"hf-hub:{repo}"
    except VitError:
        raise
    except Exception as e:  # network drop, corrupt cache file, hub error: all user-facing
        raise VitError(f"could not load timm:{name} ({type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}); "
                       "check the name (`timm.list_pretrained('vit_*')`), the cache and the network, or pass a local file") from e


def hub_snapshot(repo: str) -> Path:
    """The cached snapshot folder of a Hub repository (`hf-hub:ORG/NAME`): downloaded when missing and the
    machine is online; a VitError saying how to fetch it when offline."""
    from huggingface_hub import try_to_load_from_cache

    repo = repo.strip().split("@")[0]
    if repo.count("/") != 1:
        raise VitError(f"hf-hub: needs a repository id ORG/NAME, got {repo!r}")
    hit = try_to_load_from_cache(repo, "config.json")
    if isinstance(hit, str):
        return Path(hit).parent
    reason = offline_reason()
    if reason:
        raise VitError(f"hf-hub:{repo} is not in the Hugging Face cache and this machine is offline ({reason}). "
                       f"{fetch_hint(repo, 'hf-hub:' + repo)}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors", "*.bin"]))
    except Exception as e:
        raise VitError(f"could not download hf-hub:{repo} ({type(e).__name__}: {e})") from e


# What a timm config.json's model_args cannot carry (a class, a layer type, a LayerNorm with another eps):
# the export names a timm architecture of the same family, which fixes them.
FAMILY_KEYS = ("arch", "hybrid", "distilled", "mlp_layer", "norm_eps", "pre_norm")


def timm_architecture(cfg: Any) -> tuple[str, dict[str, Any]]:
    """A timm model name of the config's family and the create_model arguments that make it this model
    (any size), for `vit export --format timm` and `vit bench --compare timm`."""
    import timm

    from vitcli.models.registry import aliases, features, list_models, resolve_config

    args: dict[str, Any] = {"img_size": list(cfg.img_size), "num_classes": cfg.num_classes, "global_pool": cfg.global_pool}
    if cfg.hybrid:
        return next(a for a in aliases(cfg.name) if a.endswith("_224")), args
    if cfg.arch == "eva":
        args = _eva_args(cfg)
    else:
        args.update(patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim, depth=cfg.depth,
                    num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, class_token=cfg.class_token,
                    no_embed_class=cfg.no_embed_class, init_values=cfg.init_values, pre_norm=cfg.pre_norm,
                    fc_norm=cfg.fc_norm, qk_norm=cfg.qk_norm, act_layer=cfg.act_layer)
        if not cfg.distilled:
            args["reg_tokens"] = cfg.reg_tokens
    # its own name first, then the plainest of its family (a paper ViT before DeiT III for vit_pico)
    for name in sorted(list_models(), key=lambda n: (n != cfg.name, len(features(resolve_config(n))), n)):
        other = resolve_config(name)
        timm_names = [a for a in aliases(name) if timm.is_model(a)]
        if timm_names and all(getattr(other, k) == getattr(cfg, k) for k in FAMILY_KEYS):
            return timm_names[0], args
    raise VitError(f"no timm architecture has {cfg.name}'s layout "
                   f"({', '.join(f'{k}={getattr(cfg, k)}' for k in FAMILY_KEYS)})")


def _eva_args(cfg: Any) -> dict[str, Any]:
    """timm's Eva arguments for a rotary-embedding config (its own names for the same settings)."""
    return dict(img_size=list(cfg.img_size), num_classes=cfg.num_classes, global_pool=cfg.global_pool,
                patch_size=cfg.patch_size, in_chans=cfg.in_chans, embed_dim=cfg.embed_dim, depth=cfg.depth,
                num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias, qkv_fused=cfg.qkv_fused,
                qk_norm=cfg.qk_norm, swiglu_mlp=cfg.mlp_layer != "mlp", scale_mlp=cfg.scale_mlp,
                scale_attn_inner=cfg.scale_attn_inner, init_values=cfg.init_values, class_token=cfg.class_token,
                num_reg_tokens=cfg.reg_tokens, no_embed_class=cfg.no_embed_class, use_abs_pos_emb=cfg.abs_pos,
                use_rot_pos_emb=True, rope_type=cfg.rope_type, rope_temperature=cfg.rope_temperature,
                rope_rotate_half=cfg.rope_rotate_half,
                ref_feat_shape=list(cfg.rope_ref_grid) if cfg.rope_ref_grid else None,
                use_pre_transformer_norm=cfg.pre_norm, use_fc_norm=cfg.fc_norm)
