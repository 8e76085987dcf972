"""Semantic segmentation: Segmenter's decoders, sliding-window inference and the metrics, each against
an independent computation (a direct formula, whole-image inference, torchmetrics)."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

from helpers import SETS, offline_env, recipe_file, run_cli, sigterm_then_resume_matches_an_uninterrupted_run, take
from vitcli.data import LoaderSpec, builtin, load_split, make_loader, make_stream_loader, stream_split
from vitcli.data.masks import MaskSet, decode_mask
from vitcli.data.seg_sources import load_mask_split
from vitcli.data.collate import padded_stack
from vitcli.data.seg_transforms import SegTransform, SegTransformSpec, resized_size
from vitcli.data.tarshards import read_samples
from vitcli.objectives.segmentation import evaluate_segmentation
from vitcli.errors import VitError
from vitcli.engine.optim import build_optimizer, lr_at
from vitcli.models import create_model
from vitcli.models.adapt import meta_for_model, model_from_checkpoint, save_state_dict
from vitcli.models.load import load_checkpoint
from vitcli.recipe import OptimCfg, ScheduleCfg, load_recipe
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
    assert x.shape == (1, 12, 20) and m.shape == (48, 80)  # the image's shorter side to the crop size; the mask as it is
    for h, w in ((48, 80), (77, 45), (100, 33)):  # the rule evaluation uses to cut a padded batch apart
        assert resized_size(h, w, 12) == tuple(ev.geometry(torch.zeros(1, h, w)).shape[1:])


def test_batches_pad_images_and_masks_of_different_sizes():
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    ds = datasets.Dataset.from_dict({"image": [Image.new("L", (6, 4), 9), Image.new("L", (4, 8), 9)],
                                     "mask": [Image.new("L", (6, 4), 1), Image.new("L", (4, 8), 2)]}, features=features)
    tf = SegTransform(SegTransformSpec(crop_size=(4, 4), mean=(0.0,), std=(1.0,)), train=False)
    images, masks = next(iter(make_loader(MaskSet(ds, 3, ["a", "b", "c"], "toy", "val"), tf, LoaderSpec.evaluation(2))))
    assert images.shape == (2, 1, 8, 6) and masks.shape == (2, 8, 6)  # (4x6 -> 4x6), (8x4 -> 8x4): padded to 8x6
    assert (masks[0, 4:] == -1).all() and (masks[0, :4] == 1).all() and (masks[1, :, 4:] == -1).all()
    bad = datasets.Dataset.from_dict({"image": [Image.new("L", (6, 4))], "mask": [Image.new("RGB", (6, 4))]}, features=features)
    with pytest.raises(VitError, match="palette or grey PNGs"):
        next(iter(make_loader(MaskSet(bad, 3, ["a", "b", "c"], "toy", "val"), tf, LoaderSpec.evaluation(1))))


def test_evaluation_of_a_padded_batch_equals_each_image_alone():
    """Images of different sizes share a padded batch; each is cut out again and judged at its own size."""
    model = segmenter(3)
    g = torch.Generator().manual_seed(0)
    sizes = [(16, 24), (20, 16), (16, 16)]
    masks = [torch.randint(0, 3, s, generator=g) for s in sizes]
    tf = SegTransform(SegTransformSpec(crop_size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3), train=False)
    pairs = [tf(Image.fromarray(torch.randint(0, 255, (*s, 3), generator=g, dtype=torch.uint8).numpy()), m.numpy().astype(np.uint8))
             for s, m in zip(sizes, masks)]
    batch = (padded_stack([x for x, _ in pairs], 0), padded_stack([m for _, m in pairs], -1))
    together = evaluate_segmentation(model, [batch], 3, torch.device("cpu"), None, window=16, stride=8)
    alone = evaluate_segmentation(model, [(x[None], m[None]) for x, m in pairs], 3, torch.device("cpu"), None, window=16, stride=8)
    cm = ConfusionMatrix(3)
    with torch.no_grad():
        for (x, m) in pairs:  # by hand: scores resized to the mask, argmax
            scores = F.interpolate(sliding_window(model, x[None], 3, 16, 8), size=m.shape, mode="bilinear", align_corners=False)
            cm.update(scores.argmax(1)[0], m)
    assert together["miou"] == pytest.approx(alone["miou"]) == pytest.approx(cm.results()["miou"])
    assert together["num_pixels"] == sum(h * w for h, w in sizes) and together["num_images"] == 3


# ---------------------------------------------------------------------------------------------
# Checkpoints, optimizer, schedule


def test_a_segmenter_checkpoint_round_trips_and_adapts(tmp_path):
    torch.manual_seed(0)
    vit = create_model("vit_pico", img_size=16, patch_size=4, num_classes=0)
    model = Segmenter(vit, MaskTransformer(vit.embed_dim, 5, dim=32, heads=2), 5).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    meta = meta_for_model(model, {"dataset": "toy", "class_names": list("abcde")}, step=3)
    path = save_state_dict(tmp_path / "seg.safetensors", model.state_dict(), meta)
    again, ck = model_from_checkpoint(path)
    assert (ck.meta.task, ck.meta.num_classes, ck.meta.class_names, ck.meta.decoder["kind"]) == ("segmentation", 5, list("abcde"), "mask_transformer")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x))
    bigger, ck = model_from_checkpoint(path, img_size=32)  # the encoder's position table resampled, the decoder kept
    assert bigger.encoder.patch_embed.grid_size == (8, 8) and bigger(torch.randn(1, 3, 32, 32)).shape == (1, 5, 32, 32)
    other, ck = model_from_checkpoint(path, num_classes=3)
    assert other.num_classes == 3 and isinstance(other.decoder, MaskTransformer) and "decoder replaced" in ck.notes[-1]


def test_layer_decay_scales_the_encoder_blocks_and_leaves_the_decoder_whole():
    model = segmenter(4)  # vit_pico: 4 blocks
    optimizer = build_optimizer(model, OptimCfg(name="adamw", lr=1.0, layer_decay=0.5), torch.device("cpu"))
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    depth = len(model.encoder.blocks)
    assert scale[id(named["decoder.head.weight"])] == 1.0
    for i in range(depth):  # timm's rule: block i at decay^(depth - i), the stem at decay^(depth + 1)
        assert scale[id(named[f"encoder.blocks.{i}.mlp.fc1.weight"])] == pytest.approx(0.5 ** (depth - i))
    assert scale[id(named["encoder.patch_embed.proj.weight"])] == pytest.approx(0.5 ** (depth + 1))


@pytest.mark.parametrize("layer_decay", [None, 0.5])
def test_head_lr_scale_scales_the_decoder_alone_on_top_of_timms_groups(layer_decay):
    vit = encoder()
    model = Segmenter(vit, MaskTransformer(vit.embed_dim, 4, dim=32, heads=2), 4)
    groups = {}
    for scale in (1.0, 0.1):
        cfg = OptimCfg(name="adamw", lr=1.0, weight_decay=0.05, layer_decay=layer_decay, head_lr_scale=scale)
        optimizer = build_optimizer(model, cfg, torch.device("cpu"))
        groups[scale] = {id(p): (g["lr_scale"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        (plain, decay), (scaled, scaled_decay) = groups[1.0][id(p)], groups[0.1][id(p)]
        assert scaled == pytest.approx(plain * (0.1 if name.startswith("decoder.") else 1.0)), name
        assert scaled_decay == decay, name
    assert len(groups[0.1]) == len(list(model.parameters()))  # none lost in the split (torch refuses one in two groups)


def test_head_lr_scale_without_a_head_is_refused():
    with pytest.raises(VitError, match="head_lr_scale"):
        build_optimizer(torch.nn.Linear(2, 2), OptimCfg(head_lr_scale=0.1), torch.device("cpu"))


def test_poly_schedule_is_torchs_polynomial_lr():
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reference = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=50, power=0.9)
    for step in range(50):
        assert lr_at(step, 50, 0.1, ScheduleCfg(warmup_steps=0, decay="poly")) == pytest.approx(opt.param_groups[0]["lr"])
        opt.step()
        reference.step()


# ---------------------------------------------------------------------------------------------
# The commands: finetune, pretrain, eval, predict


SEG = ["--set", "data.train_subset=64", "--set", "data.eval_subset=24", "--set", "train.batch_size=8", "--set", "train.epochs=null",
       "--set", "train.steps=6", "--set", "train.eval_every=6", "--set", "data.num_workers=0"]


@pytest.fixture(scope="module")
def seg_run(trained, tmp_path_factory):
    """The 8-step digits classifier fine-tuned 6 steps on digits-seg at 16x16 (the shipped recipe), linear decoder."""
    out = tmp_path_factory.mktemp("seg") / "run"
    with offline_env():
        assert run_cli("finetune", "--ckpt", str(trained), "--task", "segmentation", "--dataset", "digits-seg", "--res", "16",
                       "--out", str(out), *SEG) == 0
    return out


def test_finetune_on_digits_seg_and_eval_reports_torchmetrics_miou(seg_run, capsys):
    meta = load_checkpoint(seg_run).meta
    assert (meta.task, meta.num_classes, meta.decoder, meta.dataset) == ("segmentation", 11, {"kind": "linear"}, "digits-seg")
    summary = json.loads((seg_run / "summary.json").read_text())
    assert summary["best_metric"] == "miou" and 0 <= summary["best_score"] <= 1
    assert run_cli("eval", "--ckpt", str(seg_run), "--json", "--num-workers", "0") == 0
    result = json.loads(capsys.readouterr().out)
    assert {"miou", "pixel_accuracy", "mean_accuracy", "per_class_iou"} <= set(result) and result["num_images"] == 500
    # by hand: every val image resized to 16 (the window), scored whole, scores resized back to 32x32, argmax
    model, ck = model_from_checkpoint(seg_run)
    val = load_mask_split("digits-seg", role="eval")
    tf = SegTransform(SegTransformSpec(crop_size=(16, 16), mean=ck.meta.preprocess.mean, std=ck.meta.preprocess.std), train=False)
    preds, truth = [], []
    with torch.no_grad():
        for row in val.dataset:
            x, m = tf(row["image"], np.asarray(row["mask"]))
            scores = F.interpolate(model(x[None]), size=m.shape, mode="bilinear", align_corners=False)
            preds.append(scores.argmax(1).flatten())
            truth.append(m.flatten())
    iou = MulticlassJaccardIndex(11, average="none")(torch.cat(preds), torch.cat(truth))
    assert result["per_class_iou"] == pytest.approx(iou.tolist(), abs=1e-5)
    assert result["pixel_accuracy"] == pytest.approx(MulticlassAccuracy(11, average="micro")(torch.cat(preds), torch.cat(truth)).item(), abs=1e-6)


def test_predict_writes_a_palette_mask_per_image_with_class_areas(seg_run, trained, tmp_path, capsys):
    val = load_mask_split("digits-seg", role="eval")
    for i in range(2):
        val.dataset[i]["image"].save(tmp_path / f"img{i}.png")
    out = tmp_path / "masks"
    assert run_cli("predict", "--ckpt", str(seg_run), str(tmp_path / "img0.png"), str(tmp_path / "img1.png"), "--masks", str(out),
                   "--overlay", "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    model, ck = model_from_checkpoint(seg_run)
    tf = SegTransform(SegTransformSpec(crop_size=(16, 16), mean=ck.meta.preprocess.mean, std=ck.meta.preprocess.std), train=False)
    for row in rows:
        written = Image.open(row["mask"])
        assert written.mode == "P" and written.size == (32, 32) and Path(row["overlay"]).is_file()
        with torch.no_grad():
            x, _ = tf(Image.open(row["path"]).convert("RGB"), np.zeros((32, 32), np.uint8))
            expected = F.interpolate(model(x[None]), size=(32, 32), mode="bilinear", align_corners=False).argmax(1)[0]
        np.testing.assert_array_equal(np.asarray(written), expected.numpy())
        assert sum(row["areas"].values()) == pytest.approx(1.0, abs=1e-4)
    assert run_cli("predict", "--ckpt", str(seg_run), str(tmp_path / "img0.png")) == 2
    assert "--masks DIR" in capsys.readouterr().err
    assert run_cli("predict", "--ckpt", str(trained), str(tmp_path / "img0.png"), "--masks", str(out)) == 2
    assert "needs a segmentation checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--dataset", "digits"], "is a classification set"),
    (["--dataset", "digits-seg", "--decoder", "upernet"], "'model.decoder' must be one of linear, mask_transformer"),
    (["--dataset", "digits-seg", "--set", "data.mixup=0.8"], "data.mixup / data.cutmix is for classification"),
])
def test_bad_segmentation_settings_are_one_clear_error(trained, tmp_path, capsys, args, message):
    assert run_cli("finetune", "--ckpt", str(trained), "--task", "segmentation", "--out", str(tmp_path / "r"), *SEG, *args) == 2
    assert message in capsys.readouterr().err


SCRATCH = [*SETS, "--set", "task=segmentation", "--set", "data.dataset=digits-seg", "--set", "data.train_subset=712",
           "--set", "data.eval_subset=16", "--set", "train.eval_every=40", "--set", "model.decoder=mask_transformer",
           "--set", "model.decoder_dim=32", "--set", "model.decoder_heads=2", "--set", "data.mean=[0.5]", "--set", "data.std=[0.5]",
           "--set", "model.in_chans=1"]


@pytest.mark.slow
def test_segmentation_from_scratch_resumes_exactly_after_sigterm(tmp_path):
    sigterm_then_resume_matches_an_uninterrupted_run(tmp_path, SCRATCH)


def test_onnx_export_of_a_segmenter_runs_in_onnxruntime(seg_run, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    out = tmp_path / "seg.onnx"
    assert run_cli("export", "--ckpt", str(seg_run), "--format", "onnx", "--out", str(out), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verified"] and report["num_classes"] == 11
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert props["task"] == "segmentation" and props["class_names"].split(",")[:2] == ["background", "0"]
    model, _ = model_from_checkpoint(seg_run)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    got = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"images": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x).numpy(), atol=1e-4)
    assert got.shape == (2, 11, 16, 16)
    assert run_cli("export", "--ckpt", str(seg_run), "--format", "timm", "--out", str(tmp_path / "t")) == 2
    assert "no model class for a Segmenter" in capsys.readouterr().err


def test_inspect_draws_images_truths_and_predictions(seg_run, tmp_path):
    out = tmp_path / "inspect"
    assert run_cli("inspect", "--ckpt", str(seg_run), "--out", str(out), "--show", "3") == 0
    summary = json.loads((out / "inspect.json").read_text())
    assert {"filters", "position", "segmentation"} <= set(summary["figures"]) and summary["num_images"] == 3
    assert Image.open(out / "segmentation.png").size[0] > 0


# ---------------------------------------------------------------------------------------------
# Tar shards of images with masks


def test_shards_of_a_segmentation_set_hold_masks_and_train(tmp_path, capsys):
    shards = tmp_path / "shards"
    assert run_cli("shards", "digits-seg", str(shards), "--samples-per-shard", "500") == 0
    index = json.loads((shards / "index.json").read_text())
    assert index["task"] == "segmentation" and index["classes"][:2] == ["background", "0"]
    assert set(index["splits"]) == {"train", "val"} and index["splits"]["val"]["num_samples"] == 500
    val = load_mask_split(str(shards), role="eval")
    original = load_mask_split("digits-seg", role="eval")
    decode = val.target_decoder()
    cells = val.dataset.cast_column("mask", datasets.Image(decode=False))
    for i in (0, 99, 499):  # the val split keeps its order; its masks come back pixel for pixel
        np.testing.assert_array_equal(decode(cells[i]["mask"]), np.asarray(original.dataset[i]["mask"]))
    capsys.readouterr()
    run = tmp_path / "run"
    assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 4}\n")), "--out", str(run), *SCRATCH,
                   "--set", f"data.dataset={shards}", "--set", "data.train_subset=null", "--set", "data.shuffle_buffer=50") == 0
    assert json.loads((run / "summary.json").read_text())["best_metric"] == "miou"
    assert run_cli("shards", "digits", str(tmp_path / "cls"), "--samples-per-shard", "500") == 0
    capsys.readouterr()
    assert run_cli("pretrain", str(recipe_file(tmp_path)), "--out", str(tmp_path / "r2"), *SCRATCH,
                   "--set", "data.dataset=" + str(tmp_path / "cls"), "--set", "data.train_subset=null") == 2
    assert "hold classification samples" in capsys.readouterr().err


def test_a_jpeg_with_a_png_beside_it_is_an_image_and_its_mask(tmp_path):
    import io as _io
    import tarfile

    def encoded(array, fmt):
        buf = _io.BytesIO()
        Image.fromarray(np.asarray(array, dtype=np.uint8)).save(buf, format=fmt)
        return buf.getvalue()

    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("a.jpg", encoded(np.zeros((4, 4, 3)), "JPEG")), ("a.png", encoded(np.full((4, 4), 3), "PNG")),
                           ("b.png", encoded(np.zeros((4, 4)), "PNG")), ("b.seg.png", encoded(np.full((4, 4), 1), "PNG"))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, _io.BytesIO(data))
    a, b = read_samples(str(path))
    assert (a.ext, b.ext) == ("jpg", "png") and a.mask is not None and b.mask is not None
    assert decode_mask({"bytes": a.mask, "path": None})[0, 0] == 3 and decode_mask({"bytes": b.mask, "path": None})[0, 0] == 1


def test_a_restored_segmentation_stream_gives_the_same_images_and_masks(tmp_path):
    shards = tmp_path / "shards"
    assert run_cli("shards", "digits-seg", str(shards), "--samples-per-shard", "250") == 0
    train = stream_split(str(shards), None)
    tf = SegTransform(SegTransformSpec(crop_size=(16, 16), mean=(0.5,), std=(0.5,)), train=True)

    def loader():
        return make_stream_loader(train, tf, LoaderSpec.training(8, seed=1), buffer=20)

    straight = take(loader(), 6)
    first = loader()
    take(first, 2)
    state = first.state_dict()
    resumed = loader()
    assert resumed.load_state_dict(state)
    for (x, y), (u, v) in zip(straight[2:], take(resumed, 4)):
        assert torch.equal(x, u) and torch.equal(y, v) and y.shape == (8, 16, 16)


def test_finetune_on_a_mask_folder_without_a_recipe_fits_segmenters_settings(trained, tmp_path, capsys):
    root = tmp_path / "seg"
    rng = np.random.default_rng(0)
    for split, n in (("train", 12), ("val", 4)):
        for i in range(n):
            classes = rng.integers(0, 3, (2, 2)).repeat(4, 0).repeat(4, 1)
            png(root / "img_dir" / split / f"im{i}.png", np.stack([classes * 80] * 3, -1))
            png(root / "ann_dir" / split / f"im{i}.png", classes)
    (root / "classes.txt").write_text("sky\nroad\ncar\n")
    out = tmp_path / "run"
    assert run_cli("finetune", "--ckpt", str(trained), "--task", "segmentation", "--dataset", str(root), "--out", str(out),
                   "--set", "train.steps=2", "--set", "data.num_workers=0") == 0
    said = capsys.readouterr().out
    assert "Segmenter's settings (SGD momentum 0.9, poly decay, drop path 0.1) fitted to 12 training images" in said
    recipe = load_recipe(out / "recipe.yaml")
    assert (recipe.task, recipe.optim.name, recipe.optim.lr, recipe.schedule.decay) == ("segmentation", "sgd", 0.001, "poly")
    assert load_checkpoint(out).meta.class_names == ["sky", "road", "car"]
