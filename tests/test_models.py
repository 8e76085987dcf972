"""Parity with timm: same parameter names/shapes, strict state-dict loading both ways, same logits."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

from vitcli.errors import VitError
from vitcli.models import VisionTransformer, create_model, list_models, model_info
from vitcli.models.hybrid import StdConv2dSame, pad_same

ATOL = 1e-5


def _logits_match(ours: torch.nn.Module, theirs: torch.nn.Module, img_size, batch: int = 1,
                  dtype: torch.dtype = torch.float32) -> None:
    """Same logits on random images: within 1e-5 in fp32, 1e-9 in fp64."""
    ours.eval().to(dtype)
    theirs.eval().to(dtype)
    torch.manual_seed(1)
    x = torch.randn(batch, 3, *img_size, dtype=dtype)
    with torch.no_grad():
        a, b = ours(x), theirs(x)
    assert a.shape == b.shape
    assert a.abs().max() > 1e-3  # not a degenerate all-zero comparison
    torch.testing.assert_close(a, b, atol=ATOL if dtype == torch.float32 else 1e-9, rtol=0)


def _empty(build):
    """Build on the meta device and allocate uninitialised storage (skips the slow default init)."""
    with torch.device("meta"):
        model = build()
    return model.to_empty(device="cpu")


@torch.no_grad()
def _randomize(model: torch.nn.Module) -> torch.nn.Module:
    """Random values in every parameter, norms and biases included, so that a mis-mapped weight cannot
    hide behind a default init (ones, zeros). The ResNet's last norm per bottleneck stays small (timm
    zero-inits it): at unit scale 16 unnormalised residual sums push fp32 rounding past 1e-5."""
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        is_norm_scale = p.ndim == 1 and "norm" in name and name.endswith("weight")
        if is_norm_scale and "norm3" not in name:
            p.copy_(1 + 0.1 * noise)
        else:
            p.copy_(0.1 * noise if is_norm_scale else 0.02 * noise)
    return model


def _timm_into_ours(timm_name: str, ours_name: str, input_hw, batch: int = 1, **kw) -> None:
    kw.setdefault("num_classes", 1000)  # timm's default tag for some names (e.g. the hybrid) has no head
    theirs = _randomize(_empty(lambda: timm.create_model(timm_name, pretrained=False, **kw)))
    ours = _empty(lambda: create_model(ours_name, **kw))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    _logits_match(ours, theirs, input_hw, batch)


def test_ti16_224_timm_into_ours():
    _timm_into_ours("vit_tiny_patch16_224", "vit_ti16", (224, 224), batch=2)


def test_b16_224_timm_into_ours():
    _timm_into_ours("vit_base_patch16_224", "ViT-B/16", (224, 224))


def test_b16_384_timm_into_ours():
    # The timm _384 alias presets img_size=384 (577 tokens).
    _timm_into_ours("vit_base_patch16_384", "vit_base_patch16_384", (384, 384))
    assert _empty(lambda: create_model("vit_base_patch16_384")).pos_embed.shape == (1, 577, 768)


@pytest.mark.parametrize("img_size", [(224, 160), (96, 64)])
def test_non_square(img_size):
    _timm_into_ours("vit_small_patch32_224", "vit_s32", img_size, img_size=img_size)
    grid = _empty(lambda: create_model("vit_s32", img_size=img_size)).patch_embed.grid_size
    assert grid == (img_size[0] // 32, img_size[1] // 32)


@pytest.mark.parametrize("class_token", [True, False])
def test_avg_pool(class_token):
    kw = dict(img_size=(64, 48), global_pool="avg", class_token=class_token)
    _timm_into_ours("vit_tiny_patch16_224", "vit_ti16", kw["img_size"], batch=2, **kw)
    ours = create_model("vit_ti16", **kw)
    assert isinstance(ours.norm, torch.nn.Identity) and isinstance(ours.fc_norm, torch.nn.LayerNorm)
    assert ours.num_prefix_tokens == int(class_token)
    assert (ours.cls_token is None) == (not class_token)


def test_no_head_returns_pooled_features():
    kw = dict(img_size=64, num_classes=0)
    _timm_into_ours("vit_tiny_patch16_224", "vit_ti16", (64, 64), batch=2, **kw)
    ours = create_model("vit_ti16", **kw).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = ours(x)
        tokens = ours.forward_features(x)
    assert feats.shape == (2, 192)
    torch.testing.assert_close(feats, tokens[:, 0])  # token pooling = the class token after the norm
    torch.testing.assert_close(ours.forward_head(tokens, pre_logits=True), feats)


def test_ours_into_timm():
    ours = _randomize(_empty(lambda: create_model("vit_ti16", img_size=(64, 96))))
    theirs = _empty(lambda: TimmViT(img_size=(64, 96), patch_size=16, embed_dim=192, depth=12, num_heads=3))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    _logits_match(ours, theirs, (64, 96), batch=2)


def test_default_init_timm_into_ours():
    # also with timm's own init (the state a user gets from timm.create_model)
    torch.manual_seed(0)
    theirs = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    ours = create_model("vit_ti16", img_size=64)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    _logits_match(ours, theirs, (64, 64), batch=2)


def test_hybrid_224_timm_into_ours():
    _timm_into_ours("vit_base_r50_s16_224", "R50+ViT-B/16", (224, 224))


def test_hybrid_ours_into_timm_non_square_fp64():
    # 72x56 is not a multiple of 16: 'SAME' padding rounds every stride-2 layer up -> 5x4 grid.
    # fp64 with every norm scale at ~1 (norm3 too): a tight check that no parameter is mis-mapped.
    ours = _randomize(_empty(lambda: create_model("r50_vit_b16", img_size=(72, 56), depth=2)))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith("norm3.weight"):
                p.add_(1.0)
    theirs = _empty(lambda: timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=1000,
                                              img_size=(72, 56), depth=2))
    assert ours.patch_embed.grid_size == tuple(theirs.patch_embed.grid_size) == (5, 4)
    assert model_info("r50_vit_b16", img_size=(72, 56))["seq_len"] == 5 * 4 + 1
    theirs.load_state_dict(ours.state_dict(), strict=True)
    _logits_match(ours, theirs, (72, 56), batch=2, dtype=torch.float64)


def test_hybrid_forward_intermediates_equals_timms():
    ours = _randomize(_empty(lambda: create_model("r50_vit_b16", img_size=(64, 48), depth=2)))
    theirs = _empty(lambda: timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=1000,
                                              img_size=(64, 48), depth=2))
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval().forward_intermediates(x, indices=[0, 1], norm=True),
                                   theirs.eval().forward_intermediates(x, indices=[0, 1], norm=True), atol=1e-4, rtol=0)


def test_hybrid_backbone_layout_matches_timm():
    ours = create_model("r50_vit_b16", depth=1)
    theirs = timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=1000, depth=1)
    tb = theirs.patch_embed.backbone
    assert isinstance(tb.norm, torch.nn.Identity)  # non-pre-activation ResNetV2: no final norm, neither in ours
    assert not any(k.startswith("patch_embed.backbone.norm") for k in ours.state_dict())
    assert tb.stem.conv.eps == ours.patch_embed.backbone.stem.conv.eps == 1e-8
    assert ours.patch_embed.backbone.num_features == 1024 and ours.patch_embed.grid_size == (14, 14)
    # timm's default init zeroes the last norm of every bottleneck; so do we
    assert torch.all(ours.patch_embed.backbone.stages[2].blocks[8].norm3.weight == 0)


def test_std_conv_and_same_padding_closed_form():
    conv = StdConv2dSame(2, 3, 3, stride=2, eps=0.0)
    with torch.no_grad():
        conv.weight.normal_()
    w = conv.weight
    ws = (w - w.mean((1, 2, 3), keepdim=True)) / w.std((1, 2, 3), unbiased=False, keepdim=True)
    x = torch.randn(1, 2, 9, 8)
    # SAME, stride 2: out = ceil(in / 2); total pad 2 on 9 rows (1 + 1), 1 on 8 cols (0 left, 1 right)
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 1, 1)), ws, stride=2)
    torch.testing.assert_close(conv(x), expected, atol=1e-5, rtol=1e-5)
    assert pad_same(x, (3, 3), (2, 2)).shape[-2:] == (11, 9)


def test_drop_path_rates_match_timm():
    with torch.device("meta"):
        ours = create_model("vit_ti16", img_size=32, drop_path_rate=0.2)
        theirs = TimmViT(img_size=32, patch_size=16, embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.2)
    want = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in theirs.blocks]
    assert [b.drop_path1.p for b in ours.blocks] == pytest.approx(want)
    assert want[0] == 0.0 and want[-1] == pytest.approx(0.2)


def test_drop_path_drops_whole_samples():
    ours = create_model("vit_pico", drop_path_rate=0.5)
    dp = ours.blocks[-1].drop_path1.train()
    x = torch.ones(4000, 3, 2)
    y = dp(x)
    per_sample = y.reshape(4000, -1)
    assert set(per_sample.unique().tolist()) <= {0.0, 2.0}  # dropped, or kept and scaled by 1/(1-p)
    assert (per_sample.min(1).values == per_sample.max(1).values).all()
    assert 0.45 < (per_sample[:, 0] == 0).float().mean() < 0.55
    assert torch.equal(dp.eval()(x), x)


def test_init_like_timm():
    torch.manual_seed(0)
    m = create_model("vit_ti16")
    assert m.cls_token.std() < 1e-5
    assert abs(m.pos_embed.std().item() - 0.02) < 1e-3
    assert abs(m.blocks[0].mlp.fc1.weight.std().item() - 0.02) < 1e-3
    assert all(torch.all(mod.bias == 0) for mod in m.modules() if isinstance(mod, torch.nn.Linear))


def test_input_size_errors():
    m = create_model("vit_pico")
    with pytest.raises(VitError, match=r"expected 8x8 input images, got 16x12.*img_size=\(16, 12\)"):
        m(torch.randn(1, 3, 16, 12))
    with pytest.raises(VitError, match="in_chans=1"):
        m(torch.randn(1, 1, 8, 8))
    with pytest.raises(VitError, match=r"batch of images shaped \(batch, 3, 8, 8\), got shape \(3, 8, 8\)"):
        m(torch.randn(3, 8, 8))
    h = create_model("r50_vit_b16", img_size=32, depth=1)
    with pytest.raises(VitError, match="expected 32x32 input images, got 64x64"):
        h(torch.randn(1, 3, 64, 64))


def test_img_size_not_multiple_of_patch():
    with pytest.raises(VitError, match="not a multiple of the patch size 16"):
        VisionTransformer(img_size=(224, 200), patch_size=16, embed_dim=64, depth=1, num_heads=2)


def _closed_form_params(c: dict, in_chans: int = 3, num_classes: int = 1000) -> int:
    d, p, m = c["embed_dim"], c["patch_size"], c["mlp_dim"]
    tokens = (c["img_size"][0] // p) * (c["img_size"][1] // p) + 1
    block = 2 * 2 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    return (d * in_chans * p * p + d) + d + tokens * d + c["depth"] * block + 2 * d + (d * num_classes + num_classes)


# Paper Table 1 / timm reference counts (1000 classes, 224).
KNOWN = {"vit_b16": 86_567_656, "vit_l16": 304_326_632, "vit_h14": 632_045_800, "r50_vit_b16": 98_659_112}


@pytest.mark.parametrize("name", list_models())
def test_param_names_shapes_and_counts_match_timm(name):
    ours_info = model_info(name)
    with torch.device("meta"):
        ours = create_model(name)
        if ours_info["hybrid"]:
            theirs = timm.create_model("vit_base_r50_s16_224", pretrained=False, num_classes=1000)
        elif ours_info["features"] or ours_info["global_pool"] != "token":  # today's families: timm's own definition
            alias = next(a for a in ours_info["aliases"] if timm.is_model(a))
            theirs = timm.create_model(alias, pretrained=False, num_classes=1000, img_size=ours.config.img_size)
        else:
            c = ours.config
            theirs = TimmViT(img_size=c.img_size, patch_size=c.patch_size, num_classes=c.num_classes,
                             embed_dim=c.embed_dim, depth=c.depth, num_heads=c.num_heads)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters()) == ours_info["params"]
    if not ours_info["hybrid"] and not ours_info["features"] and ours_info["global_pool"] == "token":
        assert count == _closed_form_params(ours_info, num_classes=ours.config.num_classes)
    if name in KNOWN:
        assert count == KNOWN[name]


@pytest.mark.parametrize("alias", ["vit_tiny_patch16_224", "vit_small_patch8_224", "vit_base_patch32_384",
                                   "vit_large_patch14_224", "vit_huge_patch14_224", "vit_base_r50_s16_384"])
def test_timm_aliases_build_timm_shapes(alias):
    with torch.device("meta"):
        ours = create_model(alias)
        theirs = timm.create_model(alias, pretrained=False, num_classes=1000)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_dropout_is_the_papers_and_matches_timm_in_training():
    """drop_rate is the paper's dropout: after every dense layer but qkv, after the position
    embedding and before the head; timm spells it proj_drop_rate + pos_drop_rate + drop_rate."""
    kw = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)
    theirs = TimmViT(**kw, drop_rate=0.3, proj_drop_rate=0.3, pos_drop_rate=0.3)
    ours = create_model("vit_pico", **kw, drop_rate=0.3)
    ours.load_state_dict(theirs.state_dict())
    ours.train(), theirs.train()
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(7)
    a = theirs(x)
    torch.manual_seed(7)
    b = ours(x)
    torch.manual_seed(8)
    c = ours(x)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(b, c, atol=1e-3)  # dropout is really active in training
