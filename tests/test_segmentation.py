"""Semantic segmentation: Segmenter's decoders, sliding-window inference and the metrics, each against
an independent computation (a direct formula, whole-image inference, torchmetrics)."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from vitcli.data import LoaderSpec, builtin, load_split, make_loader
from vitcli.data.masks import MaskSet, decode_mask
from vitcli.data.seg_sources import load_mask_split
from vitcli.data.seg_transforms import SegTransform, SegTransformSpec
from vitcli.errors import VitError
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


# ---------------------------------------------------------------------------------------------
# Data: layouts, digits-seg, joint transforms, batches


def png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode=mode).save(path)


def test_digits_seg_masks_are_the_digits_ink_and_the_set_is_fixed():
    train = load_mask_split("digits-seg", role="train")
    val = load_mask_split("digits-seg", role="eval")
    assert (len(train), len(val), train.num_classes, val.split) == (2000, 500, 11, "val")
    assert train.class_names[:2] == ["background", "0"]
    seen = set()
    for row in val.dataset.select(range(100)):
        image, mask = np.asarray(row["image"]), np.asarray(row["mask"])
        assert image.shape == mask.shape == (32, 32)
        # a pixel is a digit's exactly where some pasted digit is at least 64 bright there
        np.testing.assert_array_equal(mask > 0, image >= 64)
        seen |= set(np.unique(mask).tolist())
    assert seen == set(range(11))
    again = builtin.digits_seg_splits.__wrapped__()["val"]
    assert again[7]["mask"].tobytes() == val.dataset[7]["mask"].tobytes()  # built the same way every time


def test_generic_layout_with_class_names_and_a_missing_mask_named(tmp_path):
    root = tmp_path / "seg"
    for split, n in (("train", 3), ("val", 2)):
        for i in range(n):
            png(root / "img_dir" / split / f"im{i}.png", np.full((6, 8, 3), 40 * i))
            png(root / "ann_dir" / split / f"im{i}.png", np.full((6, 8), i))
    (root / "classes.json").write_text(json.dumps(["sky", "road", "car"]))
    train, val = load_mask_split(str(root), role="train"), load_mask_split(str(root), role="eval")
    assert (len(train), len(val), train.class_names, val.split) == (3, 2, ["sky", "road", "car"], "val")
    assert decode_mask(train.dataset.cast_column("mask", datasets.Image(decode=False))[2]["mask"]).tolist() == [[2] * 8] * 6
    (root / "classes.json").unlink()
    assert load_mask_split(str(root)).class_names == ["0", "1", "2"]  # counted from the masks
    (root / "ann_dir" / "val" / "im1.png").unlink()
    with pytest.raises(VitError, match="1 image.*have no mask.*im1"):
        load_mask_split(str(root), role="eval")


def test_ade20k_layout_ignores_zero_and_reads_objectinfo(tmp_path):
    root = tmp_path / "ADEChallengeData2016"
    for folder, split in (("training", "a"), ("validation", "b")):
        png(root / "images" / folder / f"ADE_{split}.jpg", np.zeros((4, 4, 3)))
        png(root / "annotations" / folder / f"ADE_{split}.png", [[0, 1, 2, 150]] * 4)
    (root / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n" +
                                            "".join(f"{i}\t0.1\t1\t1\tname{i};other\n" for i in range(1, 151)))
    val = load_mask_split(str(tmp_path), role="eval")
    assert val.reduce_zero_label and val.num_classes == 150 and val.class_names[:2] == ["name1", "name2"]
    cell = val.dataset.cast_column("mask", datasets.Image(decode=False))[0]["mask"]
    assert val.target_decoder()(cell)[0].tolist() == [255, 0, 1, 149]  # mmseg's reduce_zero_label


def test_voc_layout_reads_its_split_lists_and_keeps_255(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    for stem in ("2007_000032", "2007_000039", "2007_000063"):
        png(root / "JPEGImages" / f"{stem}.jpg", np.zeros((5, 5, 3)))
        palette = Image.fromarray(np.array([[0, 15, 255, 20, 1]] * 5, dtype=np.uint8), mode="P")
        palette.putpalette([v for c in range(256) for v in (c, 255 - c, c // 2)])  # VOC's masks are palette PNGs
        (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
        palette.save(root / "SegmentationClass" / f"{stem}.png")
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n2007_000039\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000063\n")
    train, val = load_mask_split(str(tmp_path), role="train"), load_mask_split(str(tmp_path), role="eval")
    assert (len(train), len(val), train.num_classes, train.class_names[15]) == (2, 1, 21, "person")
    cell = val.dataset.cast_column("mask", datasets.Image(decode=False))[0]["mask"]
    assert decode_mask(cell)[0].tolist() == [0, 15, 255, 20, 1]  # palette indices are the class ids


def test_hub_schema_copy_scene_parse_150(tmp_path):
    features = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image(),
                                  "scene_category": datasets.ClassLabel(names=["a", "b"])})
    rows = {"image": [Image.new("RGB", (4, 3))] * 2, "annotation": [Image.fromarray(np.full((3, 4), 3, np.uint8))] * 2,
            "scene_category": [0, 1]}
    datasets.DatasetDict({s: datasets.Dataset.from_dict(rows, features=features) for s in ("train", "validation")}
                         ).save_to_disk(str(tmp_path / "ade"))
    val = load_mask_split("ade20k", data_dir=str(tmp_path / "ade"), role="eval")
    assert (val.split, val.num_classes, val.reduce_zero_label, val.dataset.column_names) == ("validation", 150, True, ["image", "mask"])
    with pytest.raises(VitError, match="segmentation set"):
        load_split("digits-seg")
    with pytest.raises(VitError, match="classification set"):
        load_mask_split("digits")


def test_joint_transforms_keep_image_and_mask_aligned():
    # the mask is a function of the pixels: class = grey level // 60, over 8x8 blocks of random classes
    rng = np.random.default_rng(0)
    classes = np.kron(rng.integers(0, 4, (6, 10)), np.ones((8, 8), dtype=np.int64)).astype(np.uint8)  # 48x80
    image = Image.fromarray((classes * 60 + 20).astype(np.uint8), mode="L")
    tf = SegTransform(SegTransformSpec(crop_size=(32, 32), photometric=False, mean=(0.0,), std=(1.0,)), train=True)
    agree = total = 0
    for seed in range(30):
        torch.manual_seed(seed)
        x, m = tf(image, classes)
        assert x.shape == (1, 32, 32) and m.shape == (32, 32)
        grey = (x[0] * 255).round()
        assert (grey[m == 255] == 0).all()  # padding: image 0, mask ignored
        # inside a block (its 3x3 neighbourhood one class) the resized image is that class's grey exactly
        f = m.float()[None, None]
        inside = ((F.max_pool2d(f, 3, 1, 1) == -F.max_pool2d(-f, 3, 1, 1)) & (f != 255))[0, 0]
        agree += int(((grey // 60) == m)[inside].sum())
        total += int(inside.sum())
    assert total > 5000 and agree >= 0.99 * total  # a mis-flipped or mis-cropped mask would agree ~1/4 of the time
    ev = SegTransform(SegTransformSpec(crop_size=(12, 12), mean=(0.0,), std=(1.0,)), train=False)
    x, m = ev(image, classes)
    assert x.shape == (1, 12, 20) and m.shape == (12, 20)  # shorter side to the crop size


def test_batches_pad_images_and_masks_of_different_sizes():
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    ds = datasets.Dataset.from_dict({"image": [Image.new("L", (6, 4), 9), Image.new("L", (4, 8), 9)],
                                     "mask": [Image.new("L", (6, 4), 1), Image.new("L", (4, 8), 2)]}, features=features)
    tf = SegTransform(SegTransformSpec(crop_size=(4, 4), mean=(0.0,), std=(1.0,)), train=False)
    images, masks = next(iter(make_loader(MaskSet(ds, 3, ["a", "b", "c"], "toy", "val"), tf, LoaderSpec.evaluation(2))))
    assert images.shape == (2, 1, 8, 6) and masks.shape == (2, 8, 6)
    assert (masks[0, 4:] == 255).all() and (masks[0, :4] == 1).all() and (masks[1, :, 4:] == 255).all()
    bad = datasets.Dataset.from_dict({"image": [Image.new("L", (6, 4))], "mask": [Image.new("RGB", (6, 4))]}, features=features)
    with pytest.raises(VitError, match="palette or grey PNGs"):
        next(iter(make_loader(MaskSet(bad, 3, ["a", "b", "c"], "toy", "val"), tf, LoaderSpec.evaluation(1))))
