"""Today's ViT families (DeiT distilled, DeiT III, DINOv2 with and without registers and SwiGLU, SigLIP,
CLIP) against their independent implementations: timm's models and Hugging Face transformers.

Every timm model is built at random init and perturbed so that no tensor stays zero (LayerScale, biases,
tokens all matter), then read by vitcli through each path a user has: a bare .safetensors file, a timm
local-dir folder, `timm:<name>` from a Hugging Face cache laid out here (offline), and the transformers
format. Logits must agree within 1e-4 (fp32).
"""

from __future__ import annotations

import json

import numpy as np

import pytest
import timm
import torch
import transformers
from safetensors.torch import save_file

import vitcli
from vitcli.errors import VitError
from vitcli.models.adapt import model_from_checkpoint
from vitcli.models.load import load_checkpoint

from helpers import lay_out_cache, perturbed

ATOL = 1e-4
SMALL = dict(embed_dim=128, depth=2, num_heads=2, num_classes=5)  # head width 64: a bare file says no head count

P8 = dict(SMALL, img_size=32, patch_size=8)  # a 4x4 grid
P7 = dict(SMALL, img_size=28, patch_size=7)  # DINOv2's patch 14 halved

# family -> (timm name, small settings: the family's own layout at a test size)
FAMILIES = {
    "deit_distilled": ("deit_tiny_distilled_patch16_224", P8),
    "deit3": ("deit3_small_patch16_224", P8),
    "dinov2": ("vit_small_patch14_dinov2", P7),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", P7),
    "dinov2_swiglu": ("vit_giant_patch14_dinov2", P7),
    "siglip": ("vit_base_patch16_siglip_224", P8),
    "siglip_gap": ("vit_base_patch16_siglip_gap_224", P8),
    "clip": ("vit_base_patch16_clip_224", P8),
    "clip_quickgelu": ("vit_base_patch16_clip_quickgelu_224", P8),
    # timm's Eva class: rotary embeddings
    "eva02_packed": ("eva02_tiny_patch14_224", P8),
    "eva02_swiglu": ("eva02_base_patch14_448", P8),
    "eva02_clip": ("eva02_base_patch16_clip_224", P8),
    "dinov3": ("vit_small_patch16_dinov3", P8),
}


def small_timm(family: str) -> torch.nn.Module:
    name, kw = FAMILIES[family]
    torch.manual_seed(0)
    return perturbed(timm.create_model(name, pretrained=False, **kw))


def images(model: torch.nn.Module, n: int = 2) -> torch.Tensor:
    size = model.patch_embed.img_size
    return torch.randn(n, 3, *size, generator=torch.Generator().manual_seed(1))


def assert_same_logits(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    x = images(theirs)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs(x), atol=ATOL, rtol=0)


def timm_folder(tmp_path, family: str, model: torch.nn.Module):
    """A folder in the layout of a timm model on the Hub: config.json (architecture, model_args,
    pretrained_cfg) and model.safetensors."""
    name, kw = FAMILIES[family]
    folder = tmp_path / f"{family}-timm"
    folder.mkdir()
    cfg = {"architecture": name, "num_classes": kw["num_classes"], "model_args": kw,
           "pretrained_cfg": {"input_size": [3, kw["img_size"], kw["img_size"]], "mean": [0.5] * 3, "std": [0.5] * 3,
                              "interpolation": "bicubic", "crop_pct": 0.9}}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bare_file_and_local_dir_give_timms_logits(family, tmp_path):
    theirs = small_timm(family)
    timm_loaded = timm.create_model(f"local-dir:{timm_folder(tmp_path, family, theirs)}", pretrained=True).eval()
    assert_same_logits(timm_loaded, theirs)  # the folder is what timm itself reads
    for spec in (tmp_path / f"{family}-timm", f"local-dir:{tmp_path / f'{family}-timm'}"):
        ours, ck = model_from_checkpoint(spec)
        assert ck.format == "timm" and ours.state_dict().keys() == theirs.state_dict().keys()
        assert_same_logits(ours, theirs)
    bare = tmp_path / "bare.safetensors"
    save_file(theirs.state_dict(), str(bare))
    # a rotary-only model's file says nothing of its image size: the user gives it (vit finetune --res)
    ours, ck = model_from_checkpoint(bare, img_size=32 if family == "dinov3" else None)
    if family == "clip_quickgelu":  # nothing in a bare file says QuickGELU: the note says how to ask for it
        assert any("quick_gelu" in n for n in ck.notes)
        ours, ck = model_from_checkpoint(bare, model_args={"act_layer": "quick_gelu"})
    assert_same_logits(ours, theirs)


@pytest.mark.parametrize("family", ["deit_distilled", "dinov2_reg4", "siglip", "clip", "eva02_packed", "dinov3"])
def test_forward_intermediates_equals_timms_at_any_size_the_patch_divides(family, tmp_path):
    """Dense heads read a ViT through forward_intermediates: timm's, with dynamic_img_size, is the judge
    (prefix tokens split off, NCHW grids, position table resampled or rotary table rebuilt)."""
    name, kw = FAMILIES[family]
    theirs = small_timm(family)
    dynamic = timm.create_model(name, pretrained=False, dynamic_img_size=True, **kw).eval()
    dynamic.load_state_dict(theirs.state_dict())
    ours, _ = model_from_checkpoint(timm_folder(tmp_path, family, theirs))
    ours.eval()
    p = kw["patch_size"]
    calls = [dict(indices=[0, -1], norm=True, return_prefix_tokens=True), dict(indices=1, output_fmt="NLC"),
             dict(indices=[0], stop_early=True, intermediates_only=True)]
    for size in [(kw["img_size"], kw["img_size"]), (3 * p, 5 * p)]:
        x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(2))
        for call in calls:
            with torch.no_grad():
                torch.testing.assert_close(ours.forward_intermediates(x, **call), dynamic.forward_intermediates(x, **call),
                                           atol=ATOL, rtol=0)
    grid = ours.forward_intermediates(x, indices=1, intermediates_only=True)[0]
    assert grid.shape == (2, kw["embed_dim"], 3, 5)
    with pytest.raises(VitError, match="does not split into"):
        ours.forward_intermediates(torch.zeros(1, 3, 3 * p + 1, 5 * p))


def test_features_are_recognised_from_the_weights(tmp_path):
    expect = {
        "deit_distilled": dict(distilled=True), "deit3": dict(init_values=True, no_embed_class=True),
        "dinov2_reg4": dict(reg_tokens=4, no_embed_class=True, init_values=True),
        "dinov2_swiglu": dict(mlp_layer="swiglu_packed", act_layer="silu"),
        "siglip": dict(global_pool="map", class_token=False), "siglip_gap": dict(global_pool="avg", fc_norm=False),
        "clip": dict(pre_norm=True, norm_eps=1e-5),
        "eva02_packed": dict(mlp_layer="swiglu_packed", qkv_fused=True, rope_type="cat", rope_ref_grid=[16, 16]),
        "eva02_swiglu": dict(mlp_layer="swiglu", qkv_fused=False, scale_mlp=True),
        "eva02_clip": dict(scale_attn_inner=True, global_pool="token"),
        "dinov3": dict(reg_tokens=4, abs_pos=False, qkv_bias=False, rope_type="dinov3", rope_rotate_half=True),
    }
    for family, want in expect.items():
        path = tmp_path / f"{family}.safetensors"
        save_file(small_timm(family).state_dict(), str(path))
        args = load_checkpoint(path).meta.model_args
        assert {k: bool(args[k]) if v is True else args[k] for k, v in want.items()} == want, family


# ---------------------------------------------------------------------------------------------------
# timm:<name> from the Hugging Face cache, offline

# The real timm names of the smaller members of each family: their architecture is timm's registry's.
CACHED = ["deit_tiny_distilled_patch16_224.fb_in1k", "deit3_small_patch16_224.fb_in1k",
          "vit_small_patch14_dinov2.lvd142m", "vit_small_patch14_reg4_dinov2.lvd142m",
          "vit_base_patch16_siglip_224.webli", "vit_base_patch32_clip_quickgelu_224.openai",
          "eva02_tiny_patch14_224.mim_in22k", "vit_small_patch16_dinov3.lvd1689m"]


@pytest.mark.slow
@pytest.mark.parametrize("name", CACHED)
def test_timm_name_from_the_cache_offline(name, hf_cache):
    from timm.models import get_pretrained_cfg

    torch.manual_seed(0)
    theirs = perturbed(timm.create_model(name, pretrained=False))
    cfg = get_pretrained_cfg(name)
    filename = {"open_clip_pytorch_model.bin": "open_clip_model.safetensors"}.get(cfg.hf_hub_filename, "model.safetensors")
    lay_out_cache(hf_cache, cfg.hf_hub_id, {filename: lambda p: save_file(theirs.state_dict(), str(p))})
    ck = load_checkpoint(f"timm:{name}")
    ours, ck = model_from_checkpoint(ck)
    assert ck.meta.model == vitcli.models.resolve_name(name.split(".")[0])  # the family's own registered name
    assert ck.meta.preprocess.mean == pytest.approx(cfg.mean) and ck.meta.img_size == list(cfg.input_size[1:])
    x = torch.randn(1, 3, *cfg.input_size[1:], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=ATOL, rtol=0)


def test_uncached_timm_name_fails_fast_with_how_to_fetch(hf_cache, capsys):
    from vitcli.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--ckpt", "timm:deit_tiny_distilled_patch16_224.fb_in1k", "--dataset", "digits"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "hf download timm/deit_tiny_distilled_patch16_224.fb_in1k" in err and "Traceback" not in err


def test_unknown_timm_name_and_tag(hf_cache):
    with pytest.raises(VitError, match="timm has no model 'vit_smal_patch14_dinov2'.*Did you mean"):
        load_checkpoint("timm:vit_smal_patch14_dinov2.lvd142m")
    with pytest.raises(VitError, match="no pretrained weights named.*lvd142m"):
        load_checkpoint("timm:vit_small_patch14_dinov2.nope")


def test_hf_hub_id_from_the_cache(hf_cache, tmp_path):
    """hf-hub:<org>/<name>: a timm repository's snapshot (config.json + weights) read from the cache."""
    theirs = small_timm("dinov2_reg4")
    folder = timm_folder(tmp_path, "dinov2_reg4", theirs)
    lay_out_cache(hf_cache, "someone/tiny-dinov2-reg", {n: (lambda p, n=n: p.write_bytes((folder / n).read_bytes()))
                                                         for n in ("config.json", "model.safetensors")})
    assert_same_logits(vitcli.load_model("hf-hub:someone/tiny-dinov2-reg"), theirs)
    with pytest.raises(VitError, match="not in the Hugging Face cache.*offline"):
        load_checkpoint("hf-hub:someone/elsewhere")


# ---------------------------------------------------------------------------------------------------
# Hugging Face transformers: the library's own models, saved by it, read by vitcli

HF_SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, image_size=28,
                patch_size=7)


def hf_model(kind: str):
    torch.manual_seed(0)
    t = transformers
    if kind == "dinov2":
        return t.Dinov2Model(t.Dinov2Config(**{k: v for k, v in HF_SMALL.items() if k != "intermediate_size"}))
    if kind == "dinov2_reg":
        cfg = t.Dinov2WithRegistersConfig(num_register_tokens=4, **{k: v for k, v in HF_SMALL.items() if k != "intermediate_size"})
        return t.Dinov2WithRegistersModel(cfg)
    if kind == "deit_teacher":
        return t.DeiTForImageClassificationWithTeacher(t.DeiTConfig(num_labels=5, **HF_SMALL))
    if kind == "siglip":
        return t.SiglipVisionModel(t.SiglipVisionConfig(**HF_SMALL))
    if kind == "siglip_cls":
        return t.SiglipForImageClassification(t.SiglipConfig(vision_config=HF_SMALL, num_labels=5))
    if kind == "clip":
        return t.CLIPVisionModel(t.CLIPVisionConfig(**HF_SMALL))
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["dinov2", "dinov2_reg", "deit_teacher", "siglip", "siglip_cls", "clip"])
def test_transformers_models_read_with_their_outputs(kind, tmp_path):
    theirs = perturbed(hf_model(kind))
    theirs.save_pretrained(tmp_path / kind)
    ours, ck = model_from_checkpoint(tmp_path / kind)
    assert ck.format == "hf"
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = theirs(pixel_values=x)
        if hasattr(out, "logits"):  # classifiers: the same logits
            torch.testing.assert_close(ours(x), out.logits, atol=ATOL, rtol=0)
        else:  # encoders: the same pooled features
            torch.testing.assert_close(ours.forward_head(ours.forward_features(x), pre_logits=True),
                                       out.pooler_output, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------
# The round trip: vitcli -> vit export -> the other library's own loader

@pytest.mark.parametrize("family,fmt", [
    ("deit_distilled", "timm"), ("deit_distilled", "hf"), ("deit3", "timm"), ("dinov2", "hf"), ("dinov2_reg4", "timm"),
    ("dinov2_reg4", "hf"), ("dinov2_swiglu", "timm"), ("siglip", "timm"), ("siglip_gap", "hf"), ("clip_quickgelu", "timm"),
    ("eva02_swiglu", "timm"), ("eva02_clip", "timm"), ("dinov3", "timm"),
])
def test_export_round_trip_gives_the_same_logits(family, fmt, tmp_path):
    from vitcli.export import export

    theirs = small_timm(family)
    src = timm_folder(tmp_path, family, theirs)
    out = tmp_path / f"out-{fmt}"
    result = export(str(src), fmt, out, say=lambda _: None)
    assert result["verified"] and result["max_abs_diff"] <= ATOL
    if fmt == "timm":
        loaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        assert_same_logits(loaded, theirs)
    else:
        loaded = transformers.AutoModelForImageClassification.from_pretrained(out).eval()
        x = images(theirs)
        with torch.no_grad():
            torch.testing.assert_close(loaded(pixel_values=x).logits, theirs(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("family", ["siglip", "clip", "dinov3"])
def test_hf_export_refused_where_transformers_has_no_such_classifier(family, tmp_path):
    from vitcli.export import export

    with pytest.raises(VitError, match="--format hf needs a transformers classifier.*Use --format timm"):
        export(str(timm_folder(tmp_path, family, small_timm(family))), "hf", tmp_path / "out", say=lambda _: None)


@pytest.mark.parametrize("name,what", [
    ("vit_small_patch16_rope_224", "RoPE-ViT .*bias on the keys"),
    ("vit_small_patch16_rope_mixed_224", "learned per-layer rotary frequencies"),
])
def test_a_family_vitcli_does_not_read_is_refused_with_what_it_lacks(name, what, tmp_path):
    """timm's RoPE-ViT (Heo et al., 2024) and its RoPE-Mixed variant are the families left out: one message."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, depth=1)
    save_file(model.state_dict(), str(tmp_path / "rope.safetensors"))
    with pytest.raises(VitError, match=what):
        load_checkpoint(tmp_path / "rope.safetensors")


# ---------------------------------------------------------------------------------------------------
# Fine-tuning at a new resolution keeps the prefix tokens

@pytest.mark.parametrize("family,prefix_slots", [("deit_distilled", 2), ("dinov2_reg4", 0), ("deit3", 0),
                                                  ("eva02_swiglu", 1), ("dinov3", None)])
def test_new_resolution_resamples_the_grid_and_keeps_prefix_tokens(family, prefix_slots, tmp_path):
    from timm.layers import resample_abs_pos_embed

    theirs = small_timm(family)
    ours, ck = model_from_checkpoint(timm_folder(tmp_path, family, theirs), img_size=56 if "dinov2" in family else 64,
                                     num_classes=3)
    grid = ours.patch_embed.grid_size
    if prefix_slots is None:  # rotary embeddings only: nothing to resample, the rotations follow the grid
        assert ours.pos_embed is None and any("rotary" in n for n in ck.notes)
    else:
        expected = resample_abs_pos_embed(theirs.pos_embed, new_size=grid, num_prefix_tokens=prefix_slots)
        torch.testing.assert_close(ours.pos_embed, expected, atol=1e-6, rtol=0)
    for token in ("cls_token", "dist_token", "reg_token"):
        if getattr(theirs, token, None) is not None:
            assert torch.equal(getattr(ours, token), getattr(theirs, token))
    heads = [ours.head] + ([ours.head_dist] if family == "deit_distilled" else [])
    assert all(h.weight.shape == (3, 128) and not h.weight.any() and not h.bias.any() for h in heads)
    # timm's own model at the new size, given the same weights, computes the same
    ref = timm.create_model(FAMILIES[family][0], pretrained=False, **{**FAMILIES[family][1], "img_size": tuple(
        s * p for s, p in zip(grid, ours.patch_embed.patch_size)), "num_classes": 3})
    ref.load_state_dict(ours.state_dict())
    assert_same_logits(ours, ref.eval())


# ---------------------------------------------------------------------------------------------------
# End to end: small DINOv2-with-registers and DeiT-distilled models, fine-tuned on digits at a new size

E2E = {
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(num_classes=0)),  # an encoder, as DINOv2 ships
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(num_classes=1000)),  # an ImageNet classifier
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(E2E))
def test_finetune_eval_predict_export_on_digits(family, tmp_path, capsys):
    from helpers import run_cli

    name, kw = E2E[family]
    torch.manual_seed(0)
    src = perturbed(timm.create_model(name, pretrained=False, img_size=8, patch_size=2, embed_dim=32, depth=2,
                                      num_heads=2, **kw))
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": name, "model_args": {"num_heads": 2}}))
    save_file(src.state_dict(), str(folder / "model.safetensors"))

    run = tmp_path / "ft"
    assert run_cli("finetune", "--ckpt", str(folder), "--dataset", "digits", "--res", "16", "--out", str(run),
                   "--set", "train.steps=6", "--set", "train.batch_size=16", "--set", "train.eval_every=3",
                   "--set", "data.num_workers=0", "--set", "data.train_subset=96", "--set", "data.eval_subset=40",
                   "--set", "schedule.warmup_steps=1") == 0
    tuned, ck = model_from_checkpoint(run)
    assert ck.meta.img_size == [16, 16] and tuned.num_classes == 10
    assert tuned.num_prefix_tokens == (5 if family == "dinov2_reg4" else 2)
    assert not torch.equal(tuned.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)  # it trained

    capsys.readouterr()
    assert run_cli("eval", "--ckpt", str(run), "--json", "--fewshot", "1,2") == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["img_size"] == [16, 16] and metrics["num_images"] > 0 and 0.0 <= metrics["top1"] <= 1.0
    assert set(metrics["fewshot"]) == {"1", "2"}

    images_dir = tmp_path / "pngs"
    from vitcli.data import load_split

    split = load_split("digits", role="eval")
    images_dir.mkdir()
    for i in range(6):
        split.dataset[i]["image"].save(images_dir / f"{i}.png")
    assert run_cli("predict", "--ckpt", str(run), str(images_dir), "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 6 and all(len(r["top"]) == 5 for r in rows)

    for fmt in ("timm", "onnx", "hf"):
        out = tmp_path / f"export-{fmt}" if fmt != "onnx" else tmp_path / "model.onnx"
        assert run_cli("export", "--ckpt", str(run), "--format", fmt, "--out", str(out), "--json") == 0
        result = json.loads(capsys.readouterr().out)
        assert result["verified"], (fmt, result)


def test_masked_pretraining_of_a_rotary_model_is_one_clear_error(tmp_path, capsys):
    from helpers import run_cli

    recipe = tmp_path / "mae.yaml"
    recipe.write_text("# mae on a rotary model: refused before anything starts (vit pretrain)\nobjective: {name: mae}\n"
                      "model: {name: vit_s16_dinov3, img_size: 32, patch_size: 8, embed_dim: 64, depth: 1, num_heads: 2}\n"
                      "data: {dataset: digits, num_workers: 0}\ntrain: {steps: 1, batch_size: 8}\n")
    assert run_cli("pretrain", str(recipe), "--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert "rotary-embedding ViTs" in err and "Traceback" not in err


@pytest.mark.parametrize("family", ["deit_distilled", "dinov2_reg4", "siglip", "eva02_clip"])
def test_few_shot_features_are_the_models_pre_logits(family, tmp_path):
    """vit eval --fewshot reads the head's input: timm's forward_head(pre_logits=True), which for a
    distilled model averages the class and distillation tokens."""
    from vitcli.engine.evalrun import FeatureCapture

    theirs = small_timm(family)
    save_file(theirs.state_dict(), str(tmp_path / "w.safetensors"))
    ours, _ = model_from_checkpoint(tmp_path / "w.safetensors")
    capture = FeatureCapture(ours)
    x = images(theirs, 3)
    with torch.no_grad():
        ours(x)
        capture.add_labels(None, torch.zeros(3, dtype=torch.long))
        expected = theirs.forward_head(theirs.forward_features(x), pre_logits=True)
    feats, _ = capture.arrays()
    np.testing.assert_allclose(feats, expected.numpy(), atol=1e-5)


def test_linear_probe_of_a_distilled_model_trains_both_heads_only(tmp_path):
    from helpers import run_cli

    torch.manual_seed(0)
    src = perturbed(timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=8, patch_size=2,
                                      embed_dim=32, depth=2, num_heads=2, num_classes=3))
    save_file(src.state_dict(), str(tmp_path / "deit.safetensors"))
    run = tmp_path / "probe"
    assert run_cli("finetune", "--ckpt", str(tmp_path / "deit.safetensors"), "--dataset", "digits", "--linear-probe",
                   "--out", str(run), "--set", "train.steps=3", "--set", "train.batch_size=16", "--set", "optim.lr=0.1",
                   "--set", "data.num_workers=0", "--set", "data.train_subset=48", "--set", "data.eval_subset=16",
                   "--set", "schedule.warmup_steps=0") == 0
    tuned, _ = model_from_checkpoint(run)
    trained = {k for k, v in tuned.state_dict().items() if k not in src.state_dict() or
               v.shape != src.state_dict()[k].shape or not torch.equal(v, src.state_dict()[k])}
    assert trained == {"head.weight", "head.bias", "head_dist.weight", "head_dist.bias"}
    assert tuned.head_dist.weight.abs().sum() > 0  # started at zero, moved
