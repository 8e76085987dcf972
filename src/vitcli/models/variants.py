"""The registered models: paper Table 1 sizes (plus Ti) at the usual patch sizes, the R50 hybrid, and
`vit_pico` for the offline 8x8-digits quickstart.

Short name vit_<size><patch>; aliases in the paper's style (ViT-B/16), big_vision's (B/16) and timm's
(vit_base_patch16_224; its _384 names preset img_size=384).
"""

from __future__ import annotations

from vitcli.models.registry import build_r50_hybrid, register_model

# Width D, depth L, heads (MLP = 4 D). Ti is from DeiT / Steiner et al.; S..H from the paper / big_vision.
SIZES = {
    "ti": ("Ti", "tiny", dict(embed_dim=192, depth=12, num_heads=3)),
    "s": ("S", "small", dict(embed_dim=384, depth=12, num_heads=6)),
    "b": ("B", "base", dict(embed_dim=768, depth=12, num_heads=12)),
    "l": ("L", "large", dict(embed_dim=1024, depth=24, num_heads=16)),
    "h": ("H", "huge", dict(embed_dim=1280, depth=32, num_heads=16)),
}

# (size, patch) -> timm input sizes with a timm model of that name (aliases only where timm has one).
VARIANTS = {
    ("ti", 16): (224, 384),
    ("s", 8): (224,),
    ("s", 16): (224, 384),
    ("s", 32): (224, 384),
    ("b", 8): (224,),
    ("b", 16): (224, 384),
    ("b", 32): (224, 384),
    ("l", 14): (224,),
    ("l", 16): (224, 384),
    ("l", 32): (224, 384),
    ("h", 14): (224,),
}

# The quickstart model: 8x8 images, 2x2 patches -> 16 tokens + class token. Tune freely.
PICO = dict(img_size=8, patch_size=2, embed_dim=64, depth=4, num_heads=4, mlp_ratio=4.0, num_classes=10)


def _register_all() -> None:
    for (size, patch), timm_sizes in VARIANTS.items():
        short, long, dims = SIZES[size]
        aliases: dict[str, dict] = {f"ViT-{short}/{patch}": {}, f"{short}/{patch}": {}}
        for res in timm_sizes:
            aliases[f"vit_{long}_patch{patch}_{res}"] = {} if res == 224 else {"img_size": res}
        register_model(f"vit_{size}{patch}", patch_size=patch, aliases=aliases, **dims)

    register_model("r50_vit_b16", build=build_r50_hybrid, hybrid=True, patch_size=16, **SIZES["b"][2],
                   aliases={"R50+ViT-B/16": {}, "vit_base_r50_s16_224": {},
                            "vit_base_r50_s16_384": {"img_size": 384}})
    register_model("vit_pico", aliases=["ViT-Pico/2"], **PICO)


_register_all()
