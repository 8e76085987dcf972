"""How each Hugging Face transformers vision model names what vitcli (= timm) calls a ViT's tensors.

One `Layout` per family, read in both directions by `formats.hf`. Names are listed in both spellings
transformers uses: the files on the Hub (transformers 4: `encoder.layer.{i}.attention.attention.query`)
and transformers 5 in memory (`encoder.layer.{i}.attention.q_proj`).
"""

from __future__ import annotations

import dataclasses

# Per-block names after `encoder.layer.{i}.` / `encoder.layers.{i}.` / `layers.{i}.`: module -> vitcli module.
_VIT_BLOCK = {
    "layernorm_before": "norm1", "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_VIT_QKV = {"attention.attention.query": 0, "attention.attention.key": 1, "attention.attention.value": 2,
            "attention.q_proj": 0, "attention.k_proj": 1, "attention.v_proj": 2}
_DINOV2_BLOCK = {
    "norm1": "norm1", "norm2": "norm2",
    "attention.output.dense": "attn.proj", "attention.o_proj": "attn.proj",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "layer_scale1": "ls1", "layer_scale2": "ls2",
}
_CLIP_BLOCK = {"layer_norm1": "norm1", "layer_norm2": "norm2", "self_attn.out_proj": "attn.proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_CLIP_QKV = {"self_attn.q_proj": 0, "self_attn.k_proj": 1, "self_attn.v_proj": 2}

_VIT_EMBED = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias",
}
_CLASSIFIER = {"classifier.weight": "head.weight", "classifier.bias": "head.bias"}


@dataclasses.dataclass(frozen=True)
class Layout:
    """One transformers family.

    Attributes:
        model_types: config.json `model_type` values it covers.
        classes: transformers classes, in order of preference for export: (encoder only, classifier).
        top: tensor names outside the blocks -> vitcli names.
        block: per-block module names -> vitcli module names (`.weight`, `.bias`, LayerScale's `.lambda1`).
        qkv: per-block q/k/v projections -> their index in vitcli's fused qkv.
        dropped: name prefixes with no vitcli counterpart (pooler, MAE's mask token).
        marker: a tensor name that only this family has (detection without a config.json).
    """

    name: str
    model_types: tuple[str, ...]
    classes: tuple[str, str | None]
    top: dict[str, str]
    block: dict[str, str]
    qkv: dict[str, int]
    dropped: tuple[str, ...] = ()
    marker: str = ""


VIT = Layout("ViT", ("vit",), ("ViTModel", "ViTForImageClassification"),
             {**_VIT_EMBED, **_CLASSIFIER}, _VIT_BLOCK, _VIT_QKV, ("pooler.", "embeddings.mask_token"))
DEIT = Layout("DeiT", ("deit",), ("DeiTModel", "DeiTForImageClassificationWithTeacher"),
              {**_VIT_EMBED, "embeddings.distillation_token": "dist_token",
               "cls_classifier.weight": "head.weight", "cls_classifier.bias": "head.bias",
               "distillation_classifier.weight": "head_dist.weight", "distillation_classifier.bias": "head_dist.bias",
               **_CLASSIFIER},
              _VIT_BLOCK, _VIT_QKV, ("pooler.", "embeddings.mask_token"), marker="embeddings.distillation_token")
DINOV2 = Layout("DINOv2", ("dinov2", "dinov2_with_registers"), ("Dinov2Model", "Dinov2ForImageClassification"),
                {**_VIT_EMBED, "embeddings.register_tokens": "reg_token", **_CLASSIFIER},
                _DINOV2_BLOCK, _VIT_QKV, ("pooler.", "embeddings.mask_token"), marker="layer_scale1.lambda1")
CLIP = Layout("CLIP", ("clip_vision_model", "clip"), ("CLIPVisionModel", None),
              {"embeddings.class_embedding": "cls_token",
               "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
               "embeddings.position_embedding.weight": "pos_embed",
               "pre_layrnorm.weight": "norm_pre.weight", "pre_layrnorm.bias": "norm_pre.bias",
               "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias"},
              _CLIP_BLOCK, _CLIP_QKV, ("embeddings.position_ids",), marker="embeddings.class_embedding")
SIGLIP = Layout("SigLIP", ("siglip_vision_model", "siglip", "siglip2_vision_model"),
                ("SiglipVisionModel", "SiglipForImageClassification"),
                {"embeddings.patch_embedding.weight": "patch_embed.proj.weight",
                 "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
                 "embeddings.position_embedding.weight": "pos_embed",
                 "post_layernorm.weight": "norm.weight", "post_layernorm.bias": "norm.bias",
                 "head.probe": "attn_pool.latent",
                 "head.attention.out_proj.weight": "attn_pool.proj.weight",
                 "head.attention.out_proj.bias": "attn_pool.proj.bias",
                 "head.layernorm.weight": "attn_pool.norm.weight", "head.layernorm.bias": "attn_pool.norm.bias",
                 "head.mlp.fc1.weight": "attn_pool.mlp.fc1.weight", "head.mlp.fc1.bias": "attn_pool.mlp.fc1.bias",
                 "head.mlp.fc2.weight": "attn_pool.mlp.fc2.weight", "head.mlp.fc2.bias": "attn_pool.mlp.fc2.bias",
                 **_CLASSIFIER},
                _CLIP_BLOCK, _CLIP_QKV, ("embeddings.position_ids",), marker="embeddings.patch_embedding.weight")

LAYOUTS = (DEIT, DINOV2, CLIP, SIGLIP, VIT)  # detection order: the most specific marker first
# Prefixes transformers puts in front of the encoder's names: task models and multi-modal towers.
PREFIXES = ("vit.", "deit.", "dinov2_with_registers.", "dinov2.", "vision_model.", "model.")
# SigLIP's attention pool keeps q, k and v in one nn.MultiheadAttention matrix; vitcli splits q from kv.
SIGLIP_IN_PROJ = "head.attention.in_proj_"
