"""Registry: names, aliases, patterns, override validation, errors with suggestions, reset_classifier."""

from __future__ import annotations

import json

import pytest
import torch

import vitcli
from vitcli.errors import VitError
from vitcli.models import ModelConfig, create_model, list_models, model_info, register_model, resolve_name
from vitcli.models import registry

PAPER = ["r50_vit_b16", "vit_b16", "vit_b32", "vit_b8", "vit_h14", "vit_l14", "vit_l16", "vit_l32", "vit_pico",
         "vit_s16", "vit_s32", "vit_s8", "vit_ti16"]
TODAY = ["deit3_b16", "deit3_l16", "deit3_s16", "deit_b16_distilled", "deit_s16_distilled", "deit_ti16_distilled",
         "vit_b14_dinov2", "vit_b14_dinov2_reg4", "vit_b16_clip", "vit_b16_clip_quickgelu", "vit_b16_siglip",
         "vit_b16_siglip_gap", "vit_b32_clip", "vit_b32_clip_quickgelu", "vit_g14_dinov2", "vit_g14_dinov2_reg4",
         "vit_l14_clip", "vit_l14_clip_quickgelu", "vit_l14_dinov2", "vit_l14_dinov2_reg4", "vit_l16_siglip",
         "vit_l16_siglip_gap", "vit_s14_dinov2", "vit_s14_dinov2_reg4", "vit_so400m14_siglip", "vit_so400m14_siglip_gap",
         "eva02_ti14", "eva02_s14", "eva02_b14", "eva02_l14", "eva02_b16_clip", "eva02_l14_clip",
         "vit_s16_dinov3", "vit_b16_dinov3", "vit_l16_dinov3", "vit_b16_dinov3_qkvb"]
ALL = sorted(PAPER + TODAY)


def test_list_models_all_sorted():
    assert list_models() == ALL


@pytest.mark.parametrize("pattern, expected", [
    ("vit_b*", ["vit_b14_dinov2", "vit_b14_dinov2_reg4", "vit_b16", "vit_b16_clip", "vit_b16_clip_quickgelu",
                "vit_b16_dinov3", "vit_b16_dinov3_qkvb", "vit_b16_siglip", "vit_b16_siglip_gap", "vit_b32",
                "vit_b32_clip", "vit_b32_clip_quickgelu", "vit_b8"]),
    ("eva02_*", ["eva02_b14", "eva02_b16_clip", "eva02_l14", "eva02_l14_clip", "eva02_s14", "eva02_ti14"]),
    ("VIT_L??", ["vit_l14", "vit_l16", "vit_l32"]),  # case-insensitive
    ("*16", ["deit3_b16", "deit3_l16", "deit3_s16", "r50_vit_b16", "vit_b16", "vit_l16", "vit_s16", "vit_ti16"]),
    ("*dinov2_reg4", ["vit_b14_dinov2_reg4", "vit_g14_dinov2_reg4", "vit_l14_dinov2_reg4", "vit_s14_dinov2_reg4"]),
    ("*r50*", ["r50_vit_b16"]),
    ("*h*", ["vit_h14"]),  # canonical names only: aliases like vit_base_patch16_224 are not matched
    ("ViT-B/*", []),
    ("vit_?14", ["vit_h14", "vit_l14"]),
    ("nothing*", []),
])
def test_list_models_patterns(pattern, expected):
    assert list_models(pattern) == expected


@pytest.mark.parametrize("alias, canonical", [
    ("ViT-B/16", "vit_b16"), ("vit-b/16", "vit_b16"), ("B/16", "vit_b16"), (" VIT_B16 ", "vit_b16"),
    ("ViT-Ti/16", "vit_ti16"), ("ViT-S/8", "vit_s8"), ("ViT-L/14", "vit_l14"), ("ViT-H/14", "vit_h14"),
    ("R50+ViT-B/16", "r50_vit_b16"), ("r50+vit-b/16", "r50_vit_b16"),
    ("vit_base_patch16_224", "vit_b16"), ("vit_base_patch16_384", "vit_b16"),
    ("vit_tiny_patch16_224", "vit_ti16"), ("vit_small_patch16_224", "vit_s16"),
    ("vit_large_patch16_224", "vit_l16"), ("vit_huge_patch14_224", "vit_h14"),
    ("vit_base_r50_s16_224", "r50_vit_b16"), ("vit_base_r50_s16_384", "r50_vit_b16"),
])
def test_resolve_name(alias, canonical):
    assert resolve_name(alias) == canonical


def test_alias_defaults_and_explicit_override_wins():
    assert registry.resolve_config("vit_base_patch16_384").img_size == (384, 384)
    assert registry.resolve_config("vit_base_r50_s16_384").img_size == (384, 384)
    assert registry.resolve_config("vit_base_patch16_384", img_size=224).img_size == (224, 224)
    assert registry.resolve_config("vit_b16").img_size == (224, 224)
    assert registry.resolve_config("vit_b16").num_classes == 1000


def test_unknown_name_suggests_closest():
    with pytest.raises(VitError, match=r"unknown model 'vit_b61'.*Did you mean: .*vit_b16"):
        create_model("vit_b61")
    with pytest.raises(VitError, match=r"Did you mean: .*ViT-B/16"):
        resolve_name("ViT-B/15")
    with pytest.raises(VitError, match="Known models: deit3_b16, .*eva02_ti14, r50_vit_b16, vit_b14_dinov2, "):
        model_info("resnet50")


def test_unknown_override_key_lists_valid_keys():
    with pytest.raises(VitError, match=r"unknown model setting 'num_clases'\. Did you mean: num_classes") as e:
        create_model("vit_pico", num_clases=3)
    for key in ("num_classes", "img_size", "patch_size", "global_pool", "drop_path_rate", "class_token",
                "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "attn_drop_rate", "drop_rate"):
        assert key in str(e.value)


@pytest.mark.parametrize("overrides, message", [
    (dict(global_pool="max"), "global_pool must be one of token, avg"),
    (dict(img_size=225), "img_size 225x225 is not a multiple of the patch size 16"),
    (dict(img_size=(224, 100)), "img_size 224x100 is not a multiple of the patch size 16"),
    (dict(img_size=(224,)), r"img_size must be an integer or \[height, width\]"),
    (dict(img_size="224"), "img_size must be an integer"),
    (dict(num_classes=-1), "num_classes must be an integer >= 0"),
    (dict(depth=True), "depth must be an integer"),
    (dict(drop_path_rate=1.5), r"drop_path_rate must be a number in \[0, 1\)"),
    (dict(class_token=False), "class_token=false needs model.global_pool='avg'"),
    (dict(class_token="no", global_pool="avg"), "class_token must be true or false"),
    (dict(embed_dim=100), "embed_dim 100 must be divisible by model.num_heads 12"),
    (dict(mlp_ratio=0), "mlp_ratio must be a positive number"),
])
def test_bad_override_values(overrides, message):
    with pytest.raises(VitError, match=message):
        create_model("vit_b16", **overrides)


def test_hybrid_patch_size_is_fixed():
    with pytest.raises(VitError, match="hybrid: its patch size is fixed at 16"):
        create_model("r50_vit_b16", patch_size=8)


def test_overrides_size_the_model():
    m = create_model("vit_pico", embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, in_chans=1, img_size=(8, 4),
                     num_classes=3, patch_size=4)
    assert len(m.blocks) == 2
    assert m.blocks[0].mlp.fc1.weight.shape == (64, 32)
    assert m.blocks[0].attn.num_heads == 2
    assert m.patch_embed.proj.weight.shape == (32, 1, 4, 4)
    assert m.patch_embed.grid_size == (2, 1) and m.pos_embed.shape == (1, 3, 32)
    assert m(torch.randn(2, 1, 8, 4)).shape == (2, 3)


def test_model_carries_config_that_rebuilds_it():
    m = create_model("ViT-Pico/2", num_classes=7, img_size=(8, 6), global_pool="avg")
    assert isinstance(m.config, ModelConfig)
    assert m.config.name == "vit_pico" and m.config.num_classes == 7 and m.config.img_size == (8, 6)
    saved = json.loads(json.dumps(m.config.to_dict()))  # as a checkpoint would store it
    rebuilt = create_model(saved)
    assert rebuilt.config == m.config
    rebuilt.load_state_dict(m.state_dict(), strict=True)
    assert create_model(m.config).config == m.config
    with pytest.raises(VitError, match="needs a 'name'"):
        create_model({"num_classes": 3})


def test_model_info():
    info = model_info("ViT-B/16")
    assert info["name"] == "vit_b16" and info["params"] == 86_567_656
    assert (info["img_size"], info["patch_size"], info["embed_dim"], info["depth"], info["num_heads"],
            info["mlp_dim"], info["hybrid"], info["seq_len"]) == ((224, 224), 16, 768, 12, 12, 3072, False, 197)
    assert {"ViT-B/16", "vit_base_patch16_224", "vit_base_patch16_384"} <= set(info["aliases"])
    # only the head changes with num_classes: 1000 -> 10 removes 990 * (768 + 1)
    assert model_info("vit_b16", num_classes=10)["params"] == 86_567_656 - 990 * 769
    assert model_info("vit_base_patch16_384")["seq_len"] == 577
    hybrid = model_info("R50+ViT-B/16")
    assert hybrid["hybrid"] is True and hybrid["patch_size"] == 16 and hybrid["seq_len"] == 197
    pico = model_info("vit_pico")
    assert pico["img_size"] == (8, 8) and pico["seq_len"] == 17
    assert pico["params"] == sum(p.numel() for p in create_model("vit_pico").parameters())


def test_reset_classifier_zero_init():
    torch.manual_seed(0)
    m = create_model("vit_pico").double()
    assert m.head.weight.abs().sum() > 0
    m.reset_classifier(5)
    assert m.head.weight.shape == (5, 64) and m.head.weight.dtype == torch.float64
    assert torch.all(m.head.weight == 0) and torch.all(m.head.bias == 0)
    assert m.num_classes == 5 and m.config.num_classes == 5
    logits = m.eval()(torch.randn(2, 3, 8, 8, dtype=torch.float64))
    assert torch.equal(logits, torch.zeros(2, 5, dtype=torch.float64))
    m.reset_classifier(0)
    assert isinstance(m.head, torch.nn.Identity) and m(torch.randn(2, 3, 8, 8, dtype=torch.float64)).shape == (2, 64)


def test_register_model(monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))
    monkeypatch.setattr(registry, "_ALIASES", dict(registry._ALIASES))
    register_model("vit_test", img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=2,
                   aliases={"ViT-Test/4": {}, "vit_test_32": {"img_size": 32}})
    assert "vit_test" in list_models()
    assert create_model("vit-test/4").pos_embed.shape == (1, 17, 32)
    assert create_model("VIT_TEST_32").pos_embed.shape == (1, 65, 32)
    with pytest.raises(ValueError, match="already registered"):
        register_model("ViT_B16")
    with pytest.raises(VitError, match="not a multiple"):  # bad defaults fail at registration
        register_model("vit_bad", img_size=10, patch_size=4)


def test_package_exports():
    assert vitcli.__version__ == "0.1.0"
    assert vitcli.create_model is create_model and vitcli.list_models is list_models
    from vitcli import create_model as top_level_create_model

    assert top_level_create_model is create_model
    with pytest.raises(AttributeError):
        vitcli.no_such_thing  # noqa: B018
