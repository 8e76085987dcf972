"""Semantic segmentation: Segmenter's decoders, sliding-window inference and the metrics, each against
an independent computation (a direct formula, whole-image inference, torchmetrics)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from vitcli.models import create_model
from vitcli.models.seg_infer import segment, sliding_window
from vitcli.models.segmenter import LinearDecoder, MaskTransformer, Segmenter
from vitcli.objectives.seg_metrics import ConfusionMatrix


def encoder(**kw):
    torch.manual_seed(0)
    return create_model("vit_pico", img_size=16, patch_size=4, num_classes=0, **kw).eval()


def segmenter(classes: int) -> Segmenter:
    vit = encoder()
    return Segmenter(vit, LinearDecoder(vit.embed_dim, classes), classes).eval()


@pytest.mark.parametrize("decoder", ["linear", "mask_transformer"])
def test_a_segmenter_gives_class_maps_of_its_input_size(decoder):
    vit = encoder()
    head = LinearDecoder(vit.embed_dim, 5) if decoder == "linear" else MaskTransformer(vit.embed_dim, 5, dim=32, heads=2)
    model = Segmenter(vit, head, 5).eval()
    for size in [(16, 16), (20, 12), (17, 23)]:  # 17x23 is padded to 20x24 and cut back
        assert model(torch.randn(2, 3, *size)).shape == (2, 5, *size)


def test_linear_decoder_is_one_linear_layer_per_patch_upsampled():
    vit = encoder()
    head = LinearDecoder(vit.embed_dim, 4)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        tokens = vit.forward_features(x)[:, vit.num_prefix_tokens:]  # (1, 16, D), normalised
        grid = (tokens @ head.head.weight.T + head.head.bias).reshape(1, 4, 4, 4).permute(0, 3, 1, 2)
        expected = F.interpolate(grid, size=(16, 16), mode="bilinear", align_corners=False)
        torch.testing.assert_close(Segmenter(vit, head, 4)(x), expected, atol=1e-5, rtol=0)


def test_mask_transformer_masks_are_normalised_scalar_products():
    torch.manual_seed(1)
    dec = MaskTransformer(24, 3, dim=16, heads=2, layers=2).eval()
    grid = torch.randn(2, 24, 3, 4)
    with torch.no_grad():
        x = torch.cat([dec.proj_dec(grid.flatten(2).transpose(1, 2)), dec.cls_emb.expand(2, -1, -1)], dim=1)
        for block in dec.blocks:
            x = block(x)
        x = dec.decoder_norm(x)
        patches, classes = x[:, :12] @ dec.proj_patch, x[:, 12:] @ dec.proj_classes
        patches = patches / patches.norm(dim=-1, keepdim=True)
        classes = classes / classes.norm(dim=-1, keepdim=True)
        masks = torch.einsum("bnd,bkd->bnk", patches, classes)  # cosine of every patch with every class
        assert masks.abs().max() <= 1 + 1e-6
        expected = dec.mask_norm(masks).transpose(1, 2).reshape(2, 3, 3, 4)
        torch.testing.assert_close(dec(grid), expected)


def test_sliding_window_is_whole_image_inference_when_the_window_covers_the_image():
    model = segmenter(3).eval()
    x = torch.randn(2, 3, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(sliding_window(model, x, 3, window=24, stride=8), model(x))
        torch.testing.assert_close(segment(model, x, 3, window=32, stride=16), model(x))


def test_sliding_window_averages_the_windows_covering_each_pixel():
    def model(crop):  # a pixel's score is where its window starts: the average is checkable by hand
        return crop[:, :1].expand(-1, 2, -1, -1).clone()
    x = torch.arange(10.0).reshape(1, 1, 1, 10).expand(1, 1, 4, 10)
    out = sliding_window(model, x, 2, window=4, stride=3)  # windows at 0, 3, 6 (the last flush with the edge)
    torch.testing.assert_close(out[0, 0, 0], x[0, 0, 0])  # the identity survives averaging
    calls = []
    sliding_window(lambda c: (calls.append(c.shape), c[:, :1].expand(-1, 2, -1, -1))[1], x, 2, window=4, stride=3, chunk=1)
    assert len(calls) == 3 and all(s[-1] == 4 for s in calls)


def test_multi_scale_with_flips_averages_probabilities():
    model = segmenter(3).eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        probs = segment(model, x, 3, window=16, stride=8, scales=(1.0, 1.5), flip=True)
        views = [model(x), model(x.flip(-1)).flip(-1)]
        big = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
        for s in (sliding_window(model, big, 3, 16, 8), sliding_window(model, big.flip(-1), 3, 16, 8).flip(-1)):
            views.append(F.interpolate(s, size=(16, 16), mode="bilinear", align_corners=False))
        expected = sum(v.softmax(1) for v in views) / 4
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 16, 16))


def test_metrics_match_torchmetrics_over_the_whole_set_and_skip_the_ignore_index():
    g = torch.Generator().manual_seed(0)
    k = 5
    cm = ConfusionMatrix(k)
    preds, targets = [], []
    for _ in range(4):  # images of different sizes: sums over the set, not per-image means
        h, w = torch.randint(5, 20, (2,), generator=g).tolist()
        target = torch.randint(0, k, (1, h, w), generator=g)
        pred = torch.where(torch.rand(1, h, w, generator=g) < 0.6, target, torch.randint(0, k, (1, h, w), generator=g))
        target[torch.rand(1, h, w, generator=g) < 0.1] = 255  # ignored pixels, whatever is predicted there
        cm.update(pred, target)
        preds.append(pred.flatten())
        targets.append(target.flatten())
    pred, target = torch.cat(preds), torch.cat(targets)
    got = cm.results()
    iou = MulticlassJaccardIndex(k, average="none", ignore_index=255)(pred, target)
    assert got["per_class_iou"] == pytest.approx(iou.tolist(), abs=1e-6)
    assert got["miou"] == pytest.approx(MulticlassJaccardIndex(k, average="macro", ignore_index=255)(pred, target).item(), abs=1e-6)
    assert got["pixel_accuracy"] == pytest.approx(MulticlassAccuracy(k, average="micro", ignore_index=255)(pred, target).item(), abs=1e-6)
    assert got["mean_accuracy"] == pytest.approx(MulticlassAccuracy(k, average="macro", ignore_index=255)(pred, target).item(), abs=1e-6)
    assert got["num_pixels"] == int((target != 255).sum())


def test_a_class_absent_from_prediction_and_truth_does_not_count():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 1, 1]))
    r = cm.results()
    assert r["per_class_iou"] == [pytest.approx(1 / 2), pytest.approx(2 / 3), None]
    assert r["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
