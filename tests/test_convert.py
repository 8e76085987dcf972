"""Foreign checkpoint formats into vitcli names, checked against independent implementations:

- Google .npz: written here from a timm model by our own exporter (Google naming: HWIO kernels,
  head-split attention), validated by loading it with timm's own `_load_weights`; our loader on the
  same file must give the logits of timm's loaded model.
- HF transformers: the real `ViTForImageClassification` / `ViTModel` (random weights, no download).
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from timm.models.vision_transformer import _load_weights

from vitcli.errors import VitError
from vitcli.models import infer
from vitcli.models.formats import detect_format, npz
from vitcli.models.formats import hf as hf_format
from vitcli.models.formats.common import strip_wrappers
from vitcli.models.adapt import model_from_checkpoint
from vitcli.models.load import load_checkpoint

ATOL = 1e-5
TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5)


def timm_vit(**kw) -> torch.nn.Module:
    """A tiny timm ViT with non-trivial weights everywhere (biases and norms too)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **kw}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def logits(model: torch.nn.Module, img_size=(32, 32), batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return model.eval()(torch.randn(batch, 3, *img_size))


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=0, rtol=0, msg=k)


def assert_same_logits(ours, theirs, img_size=(32, 32)) -> None:
    a, b = logits(ours, img_size), logits(theirs, img_size)
    assert a.abs().max() > 1e-3
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Our own exporter: a timm ViT -> Google naming


def _n(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().copy()


def _hwio(w: torch.Tensor) -> np.ndarray:
    return _n(w.permute(2, 3, 1, 0))


def to_google(model, *, big_vision: bool = False, scan: bool = False, prefix: str = "",
              posemb_with_cls: bool = True) -> dict[str, np.ndarray]:
    """Google vision_transformer naming (encoderblock_{i}, LayerNorm_0/2, MHDPA_1, MlpBlock_3), or
    big_vision's (LayerNorm_0/1, MHDPA_0, MlpBlock_0, top-level pos_embedding, optional scan stacking)."""
    sd = model.state_dict()
    dim = model.embed_dim
    heads = model.blocks[0].attn.num_heads
    a: dict[str, np.ndarray] = {}
    if "patch_embed.backbone.stem.conv.weight" in sd:
        a.update(_resnet_to_google(sd))
    a["embedding/kernel"] = _hwio(sd["patch_embed.proj.weight"])
    a["embedding/bias"] = _n(sd["patch_embed.proj.bias"])
    if "cls_token" in sd:
        a["cls"] = _n(sd["cls_token"])
    pos = sd["pos_embed"] if posemb_with_cls else sd["pos_embed"][:, 1:]
    a["pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"] = _n(pos)
    ln2, mha, mlp = ("LayerNorm_1", "MultiHeadDotProductAttention_0", "MlpBlock_0") if big_vision else \
        ("LayerNorm_2", "MultiHeadDotProductAttention_1", "MlpBlock_3")
    layers = []
    for i in range(len(model.blocks)):
        b, blk = f"blocks.{i}.", {}
        blk["LayerNorm_0/scale"], blk["LayerNorm_0/bias"] = _n(sd[b + "norm1.weight"]), _n(sd[b + "norm1.bias"])
        blk[f"{ln2}/scale"], blk[f"{ln2}/bias"] = _n(sd[b + "norm2.weight"]), _n(sd[b + "norm2.bias"])
        qkv_w, qkv_b = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, name in enumerate(("query", "key", "value")):
            blk[f"{mha}/{name}/kernel"] = _n(qkv_w[j * dim:(j + 1) * dim].T.reshape(dim, heads, dim // heads))
            blk[f"{mha}/{name}/bias"] = _n(qkv_b[j * dim:(j + 1) * dim].reshape(heads, dim // heads))
        blk[f"{mha}/out/kernel"] = _n(sd[b + "attn.proj.weight"].T.reshape(heads, dim // heads, dim))
        blk[f"{mha}/out/bias"] = _n(sd[b + "attn.proj.bias"])
        for r in (0, 1):
            blk[f"{mlp}/Dense_{r}/kernel"] = _n(sd[b + f"mlp.fc{r + 1}.weight"].T)
            blk[f"{mlp}/Dense_{r}/bias"] = _n(sd[b + f"mlp.fc{r + 1}.bias"])
        layers.append(blk)
    if scan:
        for name in layers[0]:
            a[f"Transformer/encoderblock/{name}"] = np.stack([blk[name] for blk in layers])
    else:
        for i, blk in enumerate(layers):
            a.update({f"Transformer/encoderblock_{i}/{k}": v for k, v in blk.items()})
    norm = "norm" if "norm.weight" in sd else "fc_norm"
    a["Transformer/encoder_norm/scale"] = _n(sd[f"{norm}.weight"])
    a["Transformer/encoder_norm/bias"] = _n(sd[f"{norm}.bias"])
    if "head.weight" in sd:
        a["head/kernel"], a["head/bias"] = _n(sd["head.weight"].T), _n(sd["head.bias"])
    return {prefix + k: v for k, v in a.items()}


def _resnet_to_google(sd) -> dict[str, np.ndarray]:
    bb, a = "patch_embed.backbone.", {}
    a["conv_root/kernel"] = _hwio(sd[bb + "stem.conv.weight"])
    a["gn_root/scale"], a["gn_root/bias"] = _n(sd[bb + "stem.norm.weight"]), _n(sd[bb + "stem.norm.bias"])
    for k in sd:
        if k.startswith(bb + "stages.") and k.endswith(".conv1.weight"):
            s, u = int(k.split(".")[3]), int(k.split(".")[5])
            src, dst = f"{bb}stages.{s}.blocks.{u}.", f"block{s + 1}/unit{u + 1}/"
            for r in (1, 2, 3):
                a[f"{dst}conv{r}/kernel"] = _hwio(sd[f"{src}conv{r}.weight"])
                a[f"{dst}gn{r}/scale"] = _n(sd[f"{src}norm{r}.weight"])
                a[f"{dst}gn{r}/bias"] = _n(sd[f"{src}norm{r}.bias"])
            if f"{src}downsample.conv.weight" in sd:
                a[f"{dst}conv_proj/kernel"] = _hwio(sd[f"{src}downsample.conv.weight"])
                a[f"{dst}gn_proj/scale"] = _n(sd[f"{src}downsample.norm.weight"])
                a[f"{dst}gn_proj/bias"] = _n(sd[f"{src}downsample.norm.bias"])
    return a


def timm_from_npz(path, **kw) -> torch.nn.Module:
    """timm's own Google loader on our file: the independent check of the exporter."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY, **kw}).eval()
    with torch.no_grad():
        _load_weights(model, str(path))
    return model


# ---------------------------------------------------------------------------------------------------
# Google .npz


def test_google_npz_matches_timm_loader(tmp_path):
    original = timm_vit()
    path = tmp_path / "ViT-tiny.npz"
    np.savez(path, **to_google(original))
    reference = timm_from_npz(path)
    assert_same_weights(reference, original)  # the exporter is right: timm reads back the same model

    model, ck = model_from_checkpoint(path)
    assert ck.format == "npz"
    assert ck.meta.model_args["num_heads"] == 4  # read off the head-split kernels, not guessed
    assert_same_logits(model, reference)


@pytest.mark.parametrize("prefix", ["params/", "opt/target/"])
def test_big_vision_scan_layout(tmp_path, prefix):
    original = timm_vit()
    path = tmp_path / "bv.npz"
    np.savez(path, **to_google(original, big_vision=True, scan=True, prefix=prefix))
    assert "Transformer/encoderblock/LayerNorm_0/scale" in [k[len(prefix):] for k in np.load(path).files]
    if prefix == "params/":  # timm detects the big_vision layout from this prefix
        assert_same_weights(timm_from_npz(path), original)
    model, ck = model_from_checkpoint(path)
    assert_same_logits(model, original)


def test_big_vision_posemb_without_class_slot(tmp_path):
    """big_vision adds pos_embedding to the patches only and prepends the class token afterwards, which is
    a zero class-token slot in vitcli's layout."""
    original = timm_vit()
    with torch.no_grad():
        original.pos_embed[:, 0].zero_()
    path = tmp_path / "bv.npz"
    np.savez(path, **to_google(original, big_vision=True, prefix="params/", posemb_with_cls=False))
    assert np.load(path)["params/pos_embedding"].shape == (1, 16, 64)
    model, _ = model_from_checkpoint(path)
    assert_same_logits(model, original)


def test_npz_gap_model_loads_as_avg_pool_with_note():
    original = timm_vit(class_token=False, global_pool="avg")
    arrays = to_google(original)
    sd = npz.from_google_npz(arrays, notes := [])
    assert "fc_norm.weight" in sd and "cls_token" not in sd
    assert any("pooling" in n for n in notes)
    args = infer.infer_model_args(sd, num_heads=npz.npz_num_heads(arrays))
    assert (args["class_token"], args["global_pool"]) == (False, "avg")


def test_npz_pre_logits_kept_aside_and_head_replaced(tmp_path):
    arrays = to_google(timm_vit())
    arrays["pre_logits/kernel"] = np.eye(64, dtype=np.float32)
    arrays["pre_logits/bias"] = np.zeros(64, dtype=np.float32)
    path = tmp_path / "in21k.npz"
    np.savez(path, **arrays)
    ck = load_checkpoint(path)
    assert "pre_logits.fc.weight" in ck.state_dict and ck.meta.pre_logits
    with pytest.raises(VitError, match="pre-logits.*num_classes"):
        model_from_checkpoint(ck)
    model, _ = model_from_checkpoint(ck, num_classes=3)
    assert model.head.weight.shape == (3, 64) and not model.head.weight.any()


def test_npz_unknown_arrays_are_refused():
    arrays = to_google(timm_vit())
    arrays["MAPHead_0/probe"] = np.zeros((1, 1, 64), np.float32)
    with pytest.raises(VitError, match="MAP"):
        npz.from_google_npz(arrays)


def _timm_hybrid(layers, **kw):
    from timm.models.vision_transformer_hybrid import _create_vision_transformer_hybrid, _resnetv2

    return _create_vision_transformer_hybrid("vit_base_r50_s16_224", backbone=_resnetv2(layers), pretrained=False,
                                             **kw).eval()


def test_hybrid_npz_matches_timm_loader(tmp_path):
    """The R50 stem / unit / GroupNorm names, on a one-unit-per-stage ResNet to stay fast."""
    from vitcli.models.hybrid import hybrid_vit

    kw = dict(img_size=32, embed_dim=64, depth=1, num_heads=4, num_classes=5)
    torch.manual_seed(0)
    original = _timm_hybrid((1, 1, 1), **kw)
    with torch.no_grad():  # GroupNorms start at 1/0 (and 0 at each block's end): make them count
        for p in original.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "R50+ViT.npz"
    np.savez(path, **to_google(original))
    reference = _timm_hybrid((1, 1, 1), **kw)
    with torch.no_grad():
        _load_weights(reference, str(path))
    assert_same_weights(reference, original)

    sd = npz.from_google_npz(dict(np.load(path)))
    ours = hybrid_vit((1, 1, 1), **kw)
    ours.load_state_dict(sd, strict=True)
    assert_same_logits(ours, reference)
    with pytest.raises(VitError, match="R50 hybrid"):  # the registry builds (3, 4, 9) only
        infer.infer_model_args(sd)


def test_r50_hybrid_state_dict_maps_to_registered_hybrid():
    with torch.device("meta"):
        theirs = _timm_hybrid((3, 4, 9), img_size=384, num_classes=10)
    args = infer.infer_model_args(theirs.state_dict())
    assert args["hybrid"] and args["img_size"] == [384, 384] and args["num_heads"] == 12
    name, overrides, exact = infer.closest_model(args)
    assert (name, exact) == ("r50_vit_b16", True)
    from vitcli.models.registry import resolve_config

    assert resolve_config(name, **overrides).seq_len == 24 * 24 + 1


def test_bfloat16_npz_is_widened():
    arrays = to_google(timm_vit())
    bf16 = {k: (v.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view("V2") for k, v in arrays.items()}
    sd = npz.from_google_npz(bf16)
    ref = npz.from_google_npz(arrays)
    for k in ref:
        torch.testing.assert_close(sd[k], ref[k], atol=0.02, rtol=0.01)


# ---------------------------------------------------------------------------------------------------
# Hugging Face transformers


def _hf_pair(config_kw=None):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256,
                                 image_size=32, patch_size=8, num_labels=5, layer_norm_eps=1e-6,
                                 **(config_kw or {}))
    hf = transformers.ViTForImageClassification(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return transformers, cfg, hf


def _hf_logits(hf) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return hf(pixel_values=torch.randn(2, 3, 32, 32)).logits


def test_hf_in_memory_names_give_hf_logits():
    _, _, hf = _hf_pair()
    sd = hf_format.to_vitcli(hf.state_dict())
    args = infer.infer_model_args(sd, num_heads=4)
    name, overrides, _ = infer.closest_model(args)
    from vitcli.models import create_model

    ours = create_model(name, **overrides)
    ours.load_state_dict(sd, strict=True)
    torch.testing.assert_close(logits(ours), _hf_logits(hf), atol=ATOL, rtol=0)


def test_hf_saved_directory_loads_with_config(tmp_path):
    """save_pretrained writes the Hub's (transformers 4) names and config.json: heads come from the config."""
    _, _, hf = _hf_pair()
    hf.save_pretrained(tmp_path / "hf-vit")
    model, ck = model_from_checkpoint(tmp_path / "hf-vit")
    assert ck.format == "hf" and ck.meta.model_args["num_heads"] == 4
    torch.testing.assert_close(logits(model), _hf_logits(hf), atol=ATOL, rtol=0)


def test_hf_vitmodel_without_prefix_and_pooler_dropped():
    transformers, cfg, hf = _hf_pair()
    base = transformers.ViTModel(cfg).eval()
    base.load_state_dict(hf.vit.state_dict(), strict=False)  # ViTModel adds a pooler
    notes: list[str] = []
    sd = hf_format.to_vitcli(base.state_dict(), notes)
    assert "head.weight" not in sd and not any("pooler" in k for k in sd)
    assert any("pooler" in n for n in notes)
    from vitcli.models import create_model

    ours = create_model("vit_pico", **{**TINY, "num_classes": 0})
    ours.load_state_dict(sd, strict=True)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), base(pixel_values=x).last_hidden_state,
                                   atol=ATOL, rtol=0)


def test_hf_unknown_tensor_is_refused():
    with pytest.raises(VitError, match="unexpected tensors"):
        hf_format.to_vitcli({"vit.embeddings.patch_embeddings.projection.weight": torch.zeros(1),
                             "vit.embeddings.spatial_token": torch.zeros(1)})


# ---------------------------------------------------------------------------------------------------
# Format detection and architecture inference


def test_detect_format():
    sd = timm_vit().state_dict()
    assert detect_format(sd) == "timm"
    assert detect_format(sd, {"format": "vitcli"}) == "vitcli"
    assert detect_format(to_google(timm_vit())) == "npz"
    assert detect_format(["params/img/embedding/kernel"]) == "npz"
    assert detect_format(["vit.embeddings.patch_embeddings.projection.weight"]) == "hf"
    assert detect_format(["embeddings.patch_embeddings.projection.weight"]) == "hf"
    assert detect_format(["conv1.weight", "fc.weight"]) == "unknown"


def test_infer_model_args_and_registry_match():
    with torch.device("meta"):  # shapes are all inference needs
        big = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=384, num_classes=10)
    args = infer.infer_model_args(big.state_dict())
    assert args == {"embed_dim": 768, "depth": 12, "num_heads": 12, "mlp_ratio": 4.0, "patch_size": 16,
                    "img_size": [384, 384], "in_chans": 3, "num_classes": 10, "class_token": True,
                    "global_pool": "token", "qkv_bias": True, "hybrid": False}
    name, overrides, exact = infer.closest_model(args)
    assert (name, exact) == ("vit_b16", True)
    assert overrides["img_size"] == [384, 384] and overrides["num_classes"] == 10


def test_infer_num_heads_rules():
    sd = timm_vit().state_dict()  # width 64, depth 2: no registered match
    assert infer.infer_model_args(sd)["num_heads"] == 1  # head width 64
    assert infer.infer_model_args(sd, num_heads=4)["num_heads"] == 4
    pico = timm_vit(img_size=8, patch_size=2, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    assert infer.infer_model_args(pico.state_dict())["num_heads"] == 4  # from the registered vit_pico
    assert infer.closest_model(infer.infer_model_args(pico.state_dict()))[0] == "vit_pico"


def test_infer_avg_pool_and_non_square():
    sd = timm_vit(global_pool="avg", class_token=False, fc_norm=True, img_size=(32, 48)).state_dict()
    with pytest.raises(VitError, match="not a square"):
        infer.infer_model_args(sd)
    args = infer.infer_model_args(sd, img_size=(32, 48))
    assert args["img_size"] == [32, 48] and args["global_pool"] == "avg" and not args["class_token"]


@pytest.mark.parametrize("kw,what", [(dict(mlp_layer="swiglu"), "gated MLP with separate gate weights"),
                                     (dict(scale_attn_norm=True), "normalisation inside attention")])
def test_unsupported_timm_features_are_named(kw, what):
    from timm.layers import SwiGLU

    sd = timm_vit(**({**kw, "mlp_layer": SwiGLU} if "mlp_layer" in kw else kw)).state_dict()
    with pytest.raises(VitError, match=what):
        infer.infer_model_args(sd)


def test_wrapper_prefixes_stripped():
    sd = {f"module._orig_mod.{k}": v for k, v in timm_vit().state_dict().items()}
    assert "patch_embed.proj.weight" in strip_wrappers(sd)
