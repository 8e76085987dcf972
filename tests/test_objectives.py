"""The self-supervised objectives against direct computations: MPP's corruption and colour targets, MAE's
masking, loss and encoder, and what a checkpoint of either holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

from vitcli.errors import VitError
from vitcli.models import create_model
from vitcli.objectives import Inputs, MaskedPatchPrediction, build_objective
from vitcli.objectives.mae import sincos_pos_embed
from vitcli.objectives.patches import MASK, RANDOM, UNCHANGED, draw_corruption, patchify, random_masking, unpatchify
from vitcli.recipe import DinoCfg, MaeCfg, MppCfg, ObjectiveCfg

TINY_DECODER = MaeCfg(decoder_dim=32, decoder_depth=1, decoder_heads=4)

CPU = torch.device("cpu")


def pico(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("vit_pico", num_classes=0, **kw)


def test_patchify_is_the_models_patch_order_and_unpatchify_inverts_it():
    images = torch.randn(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    # patch (row 1, column 2) is the image's block [4:8, 8:12], pixels (row, column, channel)
    assert torch.equal(patches[1, 1 * 3 + 2], images[1, :, 4:8, 8:12].permute(1, 2, 0).reshape(-1))
    assert torch.equal(unpatchify(patches, 4, (2, 3), 3), images)


def test_mpp_corrupts_half_the_patches_then_80_10_10():
    g = torch.Generator().manual_seed(0)
    how = draw_corruption(4000, 16, 0.5, (0.8, 0.1, 0.1), CPU, g)
    assert ((how > 0).sum(dim=1) == 8).all()  # exactly half of every image's 16 patches
    corrupted = how[how > 0]
    shares = [(corrupted == kind).float().mean().item() for kind in (MASK, RANDOM, UNCHANGED)]
    assert shares == pytest.approx([0.8, 0.1, 0.1], abs=0.005)  # 32,000 draws: 3 sigma ~ 0.0045
    # which patches: every position equally often
    assert ((how > 0).float().mean(dim=0) - 0.5).abs().max() < 0.03


def test_mpp_corruption_replaces_embeddings_as_drawn():
    model = pico()
    mpp = MaskedPatchPrediction(model, mean=(0.5,) * 3, std=(0.5,) * 3)
    tokens = torch.randn(64, 16, model.embed_dim)
    x, how = mpp.corrupt(tokens, torch.Generator().manual_seed(1))
    assert torch.equal(x[how == 0], tokens[how == 0]) and torch.equal(x[how == UNCHANGED], tokens[how == UNCHANGED])
    assert torch.equal(x[how == MASK], mpp.mask_token.detach()[0].expand(int((how == MASK).sum()), -1))
    flat = tokens.reshape(-1, model.embed_dim)
    donors = x[how == RANDOM]
    assert all(any(torch.equal(d, t) for t in flat) for d in donors)  # another patch's embedding from the batch


def numpy_colour_classes(pixels: np.ndarray, patch: int, cells: int, bits: int) -> np.ndarray:
    """Independent: (B, C, H, W) in [0, 1] -> (B, N, cells^2) class ids, loops over patches and cells."""
    b, c, h, w = pixels.shape
    step = patch // cells
    out = np.zeros((b, (h // patch) * (w // patch), cells * cells), dtype=np.int64)
    for i in range(b):
        for n, (r, q) in enumerate((r, q) for r in range(h // patch) for q in range(w // patch)):
            for k, (u, v) in enumerate((u, v) for u in range(cells) for v in range(cells)):
                y0, x0 = r * patch + u * step, q * patch + v * step
                mean = pixels[i, :, y0:y0 + step, x0:x0 + step].reshape(c, -1).mean(axis=1)
                levels = np.minimum(np.floor(mean * 2 ** bits), 2 ** bits - 1).astype(np.int64)
                out[i, n, k] = sum(int(levels[ch]) * (2 ** bits) ** (c - 1 - ch) for ch in range(c))
    return out


@pytest.mark.parametrize("target, cells", [("mean_color", 1), ("downsized", 4)])
def test_mpp_colour_targets_equal_a_direct_numpy_computation(target, cells):
    model = create_model("vit_pico", num_classes=0, img_size=16, patch_size=8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    mpp = MaskedPatchPrediction(model, mean=mean, std=std, target=target)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 3, 16, 16)) / 255.0
    images = (torch.tensor(pixels, dtype=torch.float32) - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    got = mpp.targets(images)
    expected = numpy_colour_classes(pixels, 8, cells, 3)
    assert mpp.classes == 512
    np.testing.assert_array_equal(got.numpy(), expected[:, :, 0] if cells == 1 else expected)


def test_mpp_pixel_target_regresses_the_normalised_patch_and_the_loss_is_finite():
    model = pico()
    mpp = build_objective(ObjectiveCfg(name="mpp", mpp=MppCfg(target="pixels")), model)
    images = torch.randn(4, 3, 8, 8)
    assert torch.equal(mpp.targets(images), patchify(images, 2))
    loss, _ = mpp((images, torch.zeros(4, dtype=torch.long)))
    assert torch.isfinite(loss) and loss > 0


def test_mae_keeps_exactly_a_quarter_of_the_patches_at_random():
    g = torch.Generator().manual_seed(0)
    m = random_masking(500, 16, 0.75, CPU, g)
    assert m.keep.shape == (500, 4) and (m.mask.sum(dim=1) == 12).all()
    kept = torch.zeros(500, 16).scatter_(1, m.keep, 1.0)
    assert torch.equal(kept, 1 - m.mask)  # the kept patches are exactly the unmasked ones
    assert (kept.mean(dim=0) - 0.25).abs().max() < 0.07  # no position favoured
    shuffled = torch.gather(torch.arange(16).expand(500, -1), 1, torch.argsort(m.restore, dim=1))
    assert torch.equal(torch.gather(shuffled, 1, m.restore), torch.arange(16).expand(500, -1))


def test_mae_loss_is_the_masked_patches_mse_only():
    model = pico()
    mae = build_objective(ObjectiveCfg(name="mae", mae=TINY_DECODER), model)
    images = torch.randn(3, 3, 8, 8)
    pred, target, masking = mae.reconstruct(model, images, torch.Generator().manual_seed(5))
    per_patch = ((pred - target) ** 2).mean(-1)
    expected = per_patch[masking.mask.bool()].mean()
    assert mae.loss(model, images, torch.Generator().manual_seed(5)).item() == pytest.approx(expected.item(), rel=1e-6)
    # the target is each patch normalised by its own mean and variance
    raw = patchify(images, 2)
    assert torch.allclose(target, (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, keepdim=True) + 1e-6).sqrt())
    # changing what the decoder predicts for visible patches does not move the loss
    visible = ~masking.mask.bool()
    bent = pred.clone()
    bent[visible] += 10.0
    assert ((bent - target) ** 2).mean(-1)[masking.mask.bool()].mean().item() == pytest.approx(expected.item())


def test_mae_encoder_at_zero_masking_equals_the_plain_vit_forward():
    model = pico().eval()
    images = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        plain = model.forward_features(images)
        m = random_masking(2, 16, 0.0, CPU, torch.Generator().manual_seed(0))
        assert m.keep.shape == (2, 16)
        tokens = model.encode_patches(model.patch_embed(images), m.keep)  # every patch, in shuffled order
        unshuffled = torch.gather(tokens[:, 1:], 1, m.restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        in_order = model.encode_patches(model.patch_embed(images))
    torch.testing.assert_close(tokens[:, :1], plain[:, :1], atol=1e-5, rtol=1e-5)  # the class token
    torch.testing.assert_close(unshuffled, plain[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(in_order, plain, atol=1e-6, rtol=1e-6)


def test_decoder_position_embeddings_are_maes_sine_cosine():
    table = sincos_pos_embed(8, (2, 3))[0]
    assert table.shape == (7, 8) and torch.equal(table[0], torch.zeros(8))  # the class token's slot
    row, col = 1, 2  # grid cell 1 * 3 + 2 -> token 6
    omega = 1 / 10000 ** (np.arange(2) / 2)
    expected = np.concatenate([np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)])
    np.testing.assert_allclose(table[1 + row * 3 + col].numpy(), expected, atol=1e-6)


def test_the_encoder_state_is_timms_and_the_objectives_own_state_is_separate():
    model = pico()
    mae = build_objective(ObjectiveCfg(name="mae", mae=TINY_DECODER), model)
    own = mae.own_state()
    assert own and not any(k.startswith("model.") for k in own) and "decoder.mask_token" in own
    timm_vit = TimmViT(img_size=8, patch_size=2, embed_dim=64, depth=4, num_heads=4, num_classes=0)
    timm_vit.load_state_dict(model.state_dict(), strict=True)  # the encoder alone, timm's keys
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(timm_vit.eval()(x), model.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg, model_kw, message", [
    (dict(name="mpp", mpp=MppCfg(target="downsized")), {}, "divisible by 4"),
    (dict(name="mae", mae=MaeCfg(decoder_dim=30, decoder_heads=5)), {}, "divisible by 4"),
    (dict(name="mae"), {"model": "r50_vit_b16"}, "plain ViT"),
])
def test_objectives_refuse_models_they_cannot_serve(cfg, model_kw, message):
    name = model_kw.get("model", "vit_pico")
    model = create_model(name, num_classes=0, **({"img_size": 32} if name != "vit_pico" else {}))
    with pytest.raises(VitError, match=message):
        build_objective(ObjectiveCfg(**cfg), model)


def test_every_objective_is_built_from_the_one_registry_and_keeps_the_base_defaults():
    from torch import nn

    from vitcli.objectives import OBJECTIVES, Objective

    model = create_model("vit_pico", num_classes=10)
    assert set(OBJECTIVES) == {"supervised", "multilabel", "distill", "mpp", "mae", "dino", "segmentation", "detection"}
    # distill needs a teacher (tests/test_distill.py builds it), segmentation a Segmenter and detection a Detector
    # (below); the others the model
    small_head = DinoCfg(out_dim=64, hidden_dim=32, bottleneck_dim=16)
    built = {name: build_objective(ObjectiveCfg(name=name, mae=TINY_DECODER, dino=small_head), model, Inputs(num_classes=10))
             for name in OBJECTIVES if name not in ("distill", "segmentation", "detection")}
    # DINO's teacher, heads and centre are its own; its published weights are the teacher's backbone, not the model
    dino = built["dino"]
    assert not dino.reads_labels and dino.published() is dino.teacher["backbone"] and dino.published() is not model
    assert {"centre", "head.mlp.0.weight", "teacher.backbone.cls_token"} <= set(dino.own_state())
    assert not any(k.startswith("model.") for k in dino.own_state())
    from vitcli.errors import VitError
    from vitcli.models.segmenter import LinearDecoder, Segmenter

    with pytest.raises(VitError, match="trains a Segmenter"):
        build_objective(ObjectiveCfg(name="segmentation"), model, Inputs(num_classes=10))
    encoder = create_model("vit_pico", num_classes=0)
    segmenting = build_objective(ObjectiveCfg(name="segmentation"), Segmenter(encoder, LinearDecoder(64, 3), 3),
                                 Inputs(num_classes=3))
    assert segmenting.own_state() == {} and segmenting.best_metric == "miou" and segmenting.window == 8
    from vitcli.models.detector import Detector, DetectorSpec

    with pytest.raises(VitError, match="trains a detector"):
        build_objective(ObjectiveCfg(name="detection"), model, Inputs(num_classes=10))
    detector = Detector(create_model("vit_pico", num_classes=0), DetectorSpec(num_classes=3, size=8, channels=16))
    detecting = build_objective(ObjectiveCfg(name="detection"), detector, Inputs(num_classes=3))
    assert detecting.own_state() == {} and detecting.best_metric == "ap" and detecting.optimized() is detector
    for name, objective in built.items():
        assert isinstance(objective, Objective) and objective.name == name and objective.model is model
    supervised, mae = built["supervised"], built["mae"]
    assert supervised.reads_labels and not mae.reads_labels and not built["mpp"].reads_labels
    # a classifier adds nothing of its own: the optimizer updates the model, a checkpoint keeps no objective state
    assert supervised.own_state() == {} and supervised.optimized() is model
    # MAE's decoder and [mask] token are its own: optimized with the encoder, kept (and only they) to resume
    own = mae.own_state()
    assert own and not any(k.startswith("model.") for k in own) and mae.optimized() is mae
    assert set(own) == {k for k, _ in mae.named_parameters() if not k.startswith("model.")} | \
        {k for k, _ in mae.named_buffers() if not k.startswith("model.")}
    other = build_objective(ObjectiveCfg(name="mae", mae=TINY_DECODER),
                            create_model("vit_pico", num_classes=10))
    other.load_own_state(own)
    assert all(torch.equal(other.own_state()[k], v) for k, v in own.items())
    with pytest.raises(RuntimeError, match="does not fit"):
        other.load_own_state({**own, "extra.weight": torch.zeros(1)})
    assert supervised.score({"top1": 0.5}) == 0.5
    with pytest.raises(TypeError):  # forward and evaluate are what every objective must say
        type("Incomplete", (Objective,), {})(nn.Linear(2, 2))
