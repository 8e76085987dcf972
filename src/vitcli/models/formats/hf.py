"""Hugging Face transformers vision models <-> vitcli (= timm) names, by one rule in both directions.

Reads `ViTModel` / `ViTForImageClassification`, `DeiTModel` / `DeiTForImageClassification(WithTeacher)`,
`Dinov2Model` / `Dinov2WithRegistersModel` (and their classifiers' backbones), `SiglipVisionModel` /
`SiglipForImageClassification` and `CLIPVisionModel`; `hf_layouts` holds each family's names. Writes
(`to_hf`) the same names back for `vit export --format hf`.

Where the two layouts compute alike in different shapes the conversion says so:
- DINOv2 with registers: transformers gives the class token a position slot and the registers none;
  vitcli (as timm) folds the class slot into the class token (`no_embed_class`), the same sum.
- SigLIP's pool keeps q, k, v in one `in_proj` matrix; vitcli splits it into `q` and `kv`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from vitcli.errors import VitError, few_keys
from vitcli.models.formats.common import strip_wrappers
from vitcli.models.formats.hf_layouts import DEIT, DINOV2, LAYOUTS, PREFIXES, SIGLIP, SIGLIP_IN_PROJ, VIT, Layout

NAME = "hf"
Tensors = dict[str, torch.Tensor]

_BLOCK_RE = re.compile(r"^(?:encoder\.layers?|layers)\.(\d+)\.(.+)\.(weight|bias|lambda1)$")
_PARAM = {"weight": "weight", "bias": "bias", "lambda1": "gamma"}
_TOKENS = ("cls_token", "dist_token", "reg_token", "pos_embed", "attn_pool.latent")  # (1, n, D) in vitcli
# transformers activation names -> vitcli's
ACTS = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "quick_gelu": "quick_gelu",
        "silu": "silu", "swish": "silu"}


def _unprefixed(key: str) -> str:
    for prefix in PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def detect(keys: Iterable[str]) -> bool:
    return any(_unprefixed(k).startswith(("embeddings.patch_embeddings.", "embeddings.patch_embedding."))
               for k in keys)


def layout_for(keys: Iterable[str], model_type: str | None = None) -> Layout:
    """The family: by config.json's model_type when known, else by a tensor only that family has."""
    if model_type:
        hit = next((lay for lay in LAYOUTS if model_type in lay.model_types), None)
        if hit is None:
            known = ", ".join(t for lay in LAYOUTS for t in lay.model_types)
            raise VitError(f"the transformers config is for a '{model_type}' model, which vitcli does not read; it "
                           f"reads {known}")
        return hit
    keys = [_unprefixed(k) for k in keys]
    return next((lay for lay in LAYOUTS if lay.marker and any(lay.marker in k for k in keys)), VIT)


def to_vitcli(state_dict: Mapping[str, torch.Tensor], notes: list[str] | None = None,
              model_type: str | None = None) -> Tensors:
    """A transformers state dict (any family in hf_layouts, either naming) in vitcli (= timm) names."""
    sd = {_unprefixed(k): v for k, v in strip_wrappers(state_dict).items()}
    lay = layout_for(sd, model_type)
    out: Tensors = {}
    qkv: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    unknown, dropped = [], []
    for key, value in sd.items():
        m = _BLOCK_RE.match(key)
        if key.startswith(lay.dropped):
            dropped.append(key)
        elif key in lay.top:
            out[lay.top[key]] = value
        elif key.startswith(SIGLIP_IN_PROJ) and lay is SIGLIP:
            q, kv = value.split([value.shape[0] // 3, 2 * value.shape[0] // 3])
            param = key[len(SIGLIP_IN_PROJ):]  # weight | bias
            out[f"attn_pool.q.{param}"], out[f"attn_pool.kv.{param}"] = q, kv
        elif m and m.group(2) in lay.qkv:
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[lay.qkv[m.group(2)]] = value
        elif m and m.group(2) in lay.block:
            out[f"blocks.{m.group(1)}.{lay.block[m.group(2)]}.{_PARAM[m.group(3)]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise VitError(f"unexpected tensors for a transformers {lay.name} model: {few_keys(unknown)}; vitcli reads "
                       "ViT, DeiT, DINOv2 (without SwiGLU), SigLIP and CLIP vision checkpoints")
    for (layer, kind), parts in sorted(qkv.items()):
        if sorted(parts) != [0, 1, 2]:
            raise VitError(f"layer {layer} of the transformers checkpoint lacks some of query/key/value {kind}")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts[0], parts[1], parts[2]], dim=0)
    dim = out["patch_embed.proj.weight"].shape[0] if "patch_embed.proj.weight" in out else None
    for name in _TOKENS:
        if name in out and dim:
            out[name] = out[name].reshape(1, -1, dim)
    _family_fixes(out, lay, notes)
    if dropped and notes is not None:
        notes.append(f"dropped {len(dropped)} transformers tensors vitcli does not use (pooler / mask token)")
    return out


def _family_fixes(out: Tensors, lay: Layout, notes: list[str] | None) -> None:
    """Where a family's layout computes the same as timm's in other shapes."""
    say = notes.append if notes is not None else (lambda _: None)
    if lay is DINOV2 and "reg_token" in out:
        pos = out["pos_embed"]  # class slot + grid; registers get no position
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:].contiguous()
        say("DINOv2 with registers: the class token's position folded into the token (timm's no_embed_class layout)")
    if lay is DINOV2 and "head.weight" in out:
        w = out["head.weight"]  # Dinov2ForImageClassification reads [class token, mean of patch tokens]
        if w.shape[1] == 2 * out["patch_embed.proj.weight"].shape[0] and not w[:, w.shape[1] // 2:].any():
            out["head.weight"] = w[:, : w.shape[1] // 2].contiguous()
        else:
            del out["head.weight"], out["head.bias"]
            say("dropped the Dinov2ForImageClassification classifier: it reads the class token and the mean patch "
                "token together, which vitcli's head does not; fine-tune a new head (num_classes=N)")
    if lay is DEIT and "dist_token" in out and "head.weight" in out and "head_dist.weight" not in out:
        # DeiTForImageClassification classifies the class token alone: a copy as the distillation head
        # makes the averaged heads give the same logits.
        out["head_dist.weight"], out["head_dist.bias"] = out["head.weight"].clone(), out["head.bias"].clone()
        say("DeiTForImageClassification: its one head also serves as the distillation head (same logits)")
    if lay is SIGLIP and "head.weight" in out and "attn_pool.latent" in out:
        for k in [k for k in out if k.startswith("attn_pool.")]:
            del out[k]
        say("SiglipForImageClassification averages the tokens: its unused attention-pool weights were dropped")


def hints(folder: Path, notes: list[str]) -> dict[str, Any]:
    """model_type, heads, resolution, LayerNorm epsilon, activation, class names and normalisation from a
    transformers config.json (and preprocessor_config.json) beside the weights."""
    out: dict[str, Any] = {}
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        notes.append("no transformers config.json beside the weights: the architecture is inferred from shapes")
        return out
    if not isinstance(cfg, dict):
        return out
    if isinstance(cfg.get("vision_config"), dict):  # CLIPModel / SiglipModel: the image tower's settings
        labels = cfg.get("id2label")
        cfg = {**cfg["vision_config"], "model_type": cfg.get("model_type"), "id2label": labels}
    if cfg.get("model_type"):
        layout_for((), cfg["model_type"])  # refuses a family vitcli does not read
        out["model_type"] = cfg["model_type"]
    if "num_attention_heads" in cfg:
        out["num_heads"] = int(cfg["num_attention_heads"])
    if "image_size" in cfg:
        out["img_size"] = cfg["image_size"]
    if "layer_norm_eps" in cfg:
        out["norm_eps"] = float(cfg["layer_norm_eps"])
    act = cfg.get("hidden_act")
    if act is not None:
        if act not in ACTS:
            raise VitError(f"{folder / 'config.json'} uses activation {act!r}; vitcli's ViT has {', '.join(sorted(ACTS))}")
        out["act_layer"] = ACTS[act]
    labels = cfg.get("id2label") or {}
    names = [labels[k] for k in sorted(labels, key=int)] if labels else []
    if names and names != [f"LABEL_{i}" for i in range(len(names))]:
        out["class_names"] = names
    try:
        pre = json.loads((folder / "preprocessor_config.json").read_text())
        if "image_mean" in pre and "image_std" in pre:
            out["mean"], out["std"] = list(pre["image_mean"]), list(pre["image_std"])
    except (OSError, ValueError):
        pass
    return out


# ---------------------------------------------------------------------------------------------------
# Writing: vit export --format hf


def to_hf(state_dict: Mapping[str, torch.Tensor], hf_state: Mapping[str, torch.Tensor], layout: Layout) -> Tensors:
    """vitcli tensors under the names and shapes of a transformers model's state dict (`hf_state`, as the
    installed transformers names it): the inverse of to_vitcli."""
    sd = dict(state_dict)
    if layout is DINOV2 and "reg_token" in sd:  # back to a class slot in the table, registers without one
        pos = sd["pos_embed"]
        sd["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[-1]), pos], dim=1)
    if layout is DINOV2 and "head.weight" in sd:  # the classifier also reads the mean patch token: give it zeros
        sd["head.weight"] = torch.cat([sd["head.weight"], torch.zeros_like(sd["head.weight"])], dim=1)
    top = {hf: ours for hf, ours in layout.top.items()}
    out: Tensors = {}
    for key, ref in hf_state.items():
        k = _unprefixed(key)
        m = _BLOCK_RE.match(k)
        if k in top:
            value = sd[top[k]]
        elif k.startswith(SIGLIP_IN_PROJ):
            param = k[len(SIGLIP_IN_PROJ):]
            value = torch.cat([sd[f"attn_pool.q.{param}"], sd[f"attn_pool.kv.{param}"]], dim=0)
        elif m and m.group(2) in layout.qkv:
            value = sd[f"blocks.{m.group(1)}.attn.qkv.{m.group(3)}"].chunk(3, dim=0)[layout.qkv[m.group(2)]]
        elif m and m.group(2) in layout.block:
            value = sd[f"blocks.{m.group(1)}.{layout.block[m.group(2)]}.{_PARAM[m.group(3)]}"]
        elif k.startswith(layout.dropped):
            value = ref  # the mask token / pooler transformers builds and vitcli has no use for
        else:
            raise VitError(f"transformers {layout.name} tensor {key} has no vitcli counterpart")
        out[key] = value.reshape(ref.shape).contiguous()
    return out


def export_model(cfg: Any, class_names: list[str]) -> tuple[Any, Layout]:
    """A transformers model (random weights) whose state dict `to_hf` fills to compute what the vitcli
    model `cfg` computes; VitError naming what to use instead when transformers has no such class."""
    import transformers

    h, w = cfg.img_size
    labels = dict(id2label=dict(enumerate(class_names)), label2id={n: i for i, n in enumerate(class_names)})
    common = dict(hidden_size=cfg.embed_dim, num_hidden_layers=cfg.depth, num_attention_heads=cfg.num_heads,
                  image_size=h, patch_size=cfg.patch_size, num_channels=cfg.in_chans, layer_norm_eps=cfg.norm_eps,
                  hidden_act={v: k for k, v in reversed(list(ACTS.items()))}[cfg.act_layer])
    plain = not (cfg.reg_tokens or cfg.init_values or cfg.pre_norm or cfg.qk_norm or cfg.mlp_layer != "mlp")
    if cfg.arch == "eva":
        raise _no_class(cfg, "transformers has no classifier with EVA-02's or DINOv3's rotary embeddings in timm's layout")
    if cfg.hybrid or h != w or cfg.qk_norm or cfg.mlp_layer != "mlp":
        raise _no_class(cfg, "hybrids, non-square inputs, qk-norm and gated MLPs have no transformers class")
    if cfg.distilled and plain:
        c = transformers.DeiTConfig(intermediate_size=cfg.mlp_dim, qkv_bias=cfg.qkv_bias, **common, **labels)
        return transformers.DeiTForImageClassificationWithTeacher(c), DEIT
    if cfg.init_values and cfg.class_token and cfg.global_pool == "token" and not (cfg.pre_norm or cfg.distilled) \
            and bool(cfg.reg_tokens) == cfg.no_embed_class:  # DINOv2's layouts: registers exactly without slots
        if not float(cfg.mlp_ratio).is_integer():
            raise _no_class(cfg, "transformers' DINOv2 takes a whole-number mlp_ratio")
        args = dict(mlp_ratio=int(cfg.mlp_ratio), qkv_bias=cfg.qkv_bias, layerscale_value=cfg.init_values, **common, **labels)
        if cfg.reg_tokens:
            c = transformers.Dinov2WithRegistersConfig(num_register_tokens=cfg.reg_tokens, **args)
            return transformers.Dinov2WithRegistersForImageClassification(c), DINOV2
        return transformers.Dinov2ForImageClassification(transformers.Dinov2Config(**args)), DINOV2
    if plain and not cfg.class_token and cfg.global_pool == "avg" and cfg.fc_norm is False:
        vision = transformers.SiglipVisionConfig(intermediate_size=cfg.mlp_dim, vision_use_head=False, **common)
        c = transformers.SiglipConfig(vision_config=vision.to_dict(), **labels)
        return transformers.SiglipForImageClassification(c), SIGLIP
    if plain and cfg.class_token and cfg.global_pool == "token" and not cfg.distilled and cfg.fc_norm is not True:
        c = transformers.ViTConfig(intermediate_size=cfg.mlp_dim, qkv_bias=cfg.qkv_bias, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, **common, **labels)
        return transformers.ViTForImageClassification(c), VIT
    raise _no_class(cfg, _why_not(cfg))


def _why_not(cfg: Any) -> str:
    if cfg.global_pool == "map":
        return "transformers' SiglipForImageClassification averages the tokens instead of using the attention pool"
    if cfg.pre_norm:
        return "transformers' CLIPForImageClassification averages unnormalised patch tokens instead of the class token"
    if cfg.global_pool == "avg":
        return "transformers has no ViT classifier that normalises after average pooling"
    return "no transformers classifier pools and normalises as it does"


def _no_class(cfg: Any, why: str) -> VitError:
    return VitError(f"--format hf needs a transformers classifier that computes what {cfg.name} computes: {why}. "
                    "Use --format timm, onnx or exported-program.")
