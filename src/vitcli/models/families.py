"""The ViT families people fine-tune today, registered under short names and timm's names: DeiT
(distilled), DeiT III, DINOv2, SigLIP, CLIP, and the rotary-embedding EVA-02 and DINOv3.

Short names follow the paper's: vit_<size><patch> plus the family (`vit_s14_dinov2_reg4`,
`vit_b16_siglip`, `vit_b16_clip_quickgelu`, `vit_b16_dinov3`), `deit_<size><patch>_distilled`,
`deit3_<size><patch>` and `eva02_<size><patch>`.
Each timm name is an alias that presets its input size (`deit3_base_patch16_384` -> img_size 384), so
`timm:<name>.<tag>` and a timm local-dir folder map onto the same configuration. Architectures and
preprocessing are those of timm's model definitions and pretrained_cfg.
"""

from __future__ import annotations

from vitcli.io.meta import Preprocessing
from vitcli.models.registry import build_eva, register_model
from vitcli.models.variants import SIZES

IMAGENET = Preprocessing(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), interpolation="bicubic",
                         crop_pct=0.9)
OPENAI_CLIP = Preprocessing(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711),
                            interpolation="bicubic", crop_pct=0.9)
SIGLIP = Preprocessing(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=0.9)
DINOV2 = Preprocessing(mean=IMAGENET.mean, std=IMAGENET.std, interpolation="bicubic", crop_pct=1.0)

GIANT = dict(embed_dim=1536, depth=40, num_heads=24)  # DINOv2's ViT-g
SO400M = dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362)  # SigLIP's shape-optimised 400M


def _aliases(timm_name: str, sizes: tuple[int, ...], default: int) -> dict[str, dict]:
    """timm's names of one architecture at each input size, e.g. deit3_base_patch16_{224,384}."""
    return {timm_name.format(res=res): ({} if res == default else {"img_size": res}) for res in sizes}


def _deit() -> None:
    # DeiT (Touvron et al., 2021) distilled: class + distillation tokens, two heads averaged.
    for size in ("ti", "s", "b"):
        short, long, dims = SIZES[size]
        sizes = (224, 384) if size == "b" else (224,)
        register_model(f"deit_{size}16_distilled", distilled=True, patch_size=16, preprocess=IMAGENET,
                       aliases=_aliases(f"deit_{long}_distilled_patch16_{{res}}", sizes, 224), **dims)
    # DeiT III (Touvron et al., 2022): LayerScale, a position table without the class slot.
    for size in ("s", "b", "l"):
        short, long, dims = SIZES[size]
        register_model(f"deit3_{size}16", patch_size=16, no_embed_class=True, init_values=1e-6,
                       preprocess=IMAGENET, aliases=_aliases(f"deit3_{long}_patch16_{{res}}", (224, 384), 224), **dims)


def _dinov2() -> None:
    # DINOv2 (Oquab et al., 2024) at its 518-px pretraining size; registers (Darcet et al., 2024)
    # carry no position embedding, hence no_embed_class.
    dims = {size: SIZES[size] for size in ("s", "b", "l")}
    dims["g"] = ("g", "giant", dict(GIANT, mlp_ratio=2.66667 * 2, mlp_layer="swiglu_packed", act_layer="silu"))
    for size, (_, long, arch) in dims.items():
        common = dict(patch_size=14, img_size=518, init_values=1e-5, preprocess=DINOV2, **arch)
        register_model(f"vit_{size}14_dinov2", aliases=[f"vit_{long}_patch14_dinov2"], **common)
        register_model(f"vit_{size}14_dinov2_reg4", reg_tokens=4, no_embed_class=True,
                       aliases=[f"vit_{long}_patch14_reg4_dinov2"], **common)


def _siglip() -> None:
    # SigLIP (Zhai et al., 2023) and SigLIP 2 (same towers, timm tags *.v2_webli): no class token,
    # an attention-pool head; the `gap` towers average the normalised tokens instead.
    towers = {
        "vit_b16_siglip": (dict(SIZES["b"][2], patch_size=16), "vit_base_patch16_siglip_{res}", (224, 256, 384, 512), 224),
        "vit_l16_siglip": (dict(SIZES["l"][2], patch_size=16), "vit_large_patch16_siglip_{res}", (256, 384), 256),
        "vit_so400m14_siglip": (dict(SO400M, patch_size=14), "vit_so400m_patch14_siglip_{res}", (224, 378), 224),
    }
    for name, (arch, timm_name, sizes, default) in towers.items():
        register_model(name, img_size=default, class_token=False, global_pool="map", preprocess=SIGLIP,
                       aliases=_aliases(timm_name, sizes, default), **arch)
        gap = timm_name.replace("_siglip_", "_siglip_gap_")
        register_model(f"{name}_gap", img_size=default, class_token=False, global_pool="avg", fc_norm=False,
                       preprocess=SIGLIP, aliases=_aliases(gap, sizes, default), **arch)


def _clip() -> None:
    # CLIP image towers (Radford et al., 2021; OpenCLIP): LayerNorm before the encoder (eps 1e-5),
    # no patch bias. OpenAI's weights were trained with QuickGELU (the *_quickgelu names).
    towers = {"b16": ("b", 16), "b32": ("b", 32), "l14": ("l", 14)}
    for short, (size, patch) in towers.items():
        _, long, dims = SIZES[size]
        common = dict(patch_size=patch, pre_norm=True, norm_eps=1e-5, preprocess=OPENAI_CLIP, **dims)
        register_model(f"vit_{short}_clip", aliases=[f"vit_{long}_patch{patch}_clip_224"], **common)
        register_model(f"vit_{short}_clip_quickgelu", act_layer="quick_gelu",
                       aliases=[f"vit_{long}_patch{patch}_clip_quickgelu_224"], **common)


def _eva02() -> None:
    # EVA-02 (Fang et al., 2024): MIM-pretrained towers with axial RoPE scaled to a 16x16 reference grid
    # (224/14), SwiGLU (packed for Ti/S; separate gates and an inner LayerNorm for B/L) and a learned table.
    towers = {
        "ti": ("tiny", dict(embed_dim=192, depth=12, num_heads=3, mlp_layer="swiglu_packed"), (224, 336)),
        "s": ("small", dict(embed_dim=384, depth=12, num_heads=6, mlp_layer="swiglu_packed"), (224, 336)),
        "b": ("base", dict(SIZES["b"][2], mlp_layer="swiglu", qkv_fused=False, scale_mlp=True), (224, 448)),
        "l": ("large", dict(SIZES["l"][2], mlp_layer="swiglu", qkv_fused=False, scale_mlp=True), (224, 448)),
    }
    common = dict(build=build_eva, arch="eva", patch_size=14, mlp_ratio=4 * 2 / 3, rope_type="cat",
                  rope_ref_grid=(16, 16), global_pool="avg", preprocess=OPENAI_CLIP)
    for size, (long, arch, sizes) in towers.items():
        register_model(f"eva02_{size}14", aliases=_aliases(f"eva02_{long}_patch14_{{res}}", sizes, 224), **common, **arch)
    clip = dict(common, global_pool="token", mlp_layer="swiglu", qkv_fused=False, scale_mlp=True, scale_attn_inner=True)
    register_model("eva02_b16_clip", aliases=["eva02_base_patch16_clip_224"], **{**clip, "patch_size": 16}, **SIZES["b"][2])
    register_model("eva02_l14_clip", aliases=_aliases("eva02_large_patch14_clip_{res}", (224, 336), 224), **clip,
                   **SIZES["l"][2])


def _dinov3() -> None:
    # DINOv3 (Simeoni et al., 2025): 4 registers, LayerScale, RoPE on normalised coordinates (base 100,
    # half rotation) and no learned position table; timm averages the patch tokens (fc_norm off).
    common = dict(build=build_eva, arch="eva", patch_size=16, img_size=256, reg_tokens=4, init_values=1e-5,
                  rope_type="dinov3", rope_temperature=100.0, rope_rotate_half=True, abs_pos=False, fc_norm=False,
                  global_pool="avg", norm_eps=1e-5, preprocess=DINOV2)
    for size in ("s", "b", "l"):
        _, long, dims = SIZES[size]
        register_model(f"vit_{size}16_dinov3", qkv_bias=False, aliases=[f"vit_{long}_patch16_dinov3"], **common, **dims)
    register_model("vit_b16_dinov3_qkvb", qkv_bias=True, aliases=["vit_base_patch16_dinov3_qkvb"], **common,
                   **SIZES["b"][2])


_deit()
_dinov2()
_siglip()
_clip()
_eva02()
_dinov3()
