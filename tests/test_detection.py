"""Detection with a plain ViT (ViTDet): the simple feature pyramid's strides and shapes, window attention
against global attention and against attention computed window by window, the backbone contract of
torchvision's detection models, and COCO AP against pycocotools reading COCO's files and closed forms."""

from __future__ import annotations

import json
import math

import pytest
import torch
from timm.optim._param_groups import param_groups_layer_decay
from torchvision.models.detection import FasterRCNN

from vitcli.errors import VitError
from vitcli.io.meta import CheckpointMeta, Preprocessing
from vitcli.models.adapt import meta_for_model, model_from_checkpoint, save_state_dict
from vitcli.models import create_model
from vitcli.models.detection_backbone import ViTDetBackbone
from vitcli.models.detector import DETECTORS, Detector, DetectorSpec, level_strides
from vitcli.models.eva import Eva
from vitcli.models.windows import window_partition, window_unpartition, windowed_block
from vitcli.objectives import Inputs, build_objective
from vitcli.objectives.coco_metrics import STAT_KEYS, CocoAP
from vitcli.recipe import ObjectiveCfg


def encoder(img_size: int = 224, patch_size: int = 16, **kw):
    torch.manual_seed(0)
    return create_model("vit_pico", img_size=img_size, patch_size=patch_size, num_classes=0, **kw).eval()


@pytest.mark.parametrize("patch", [14, 16])
@pytest.mark.parametrize("size", [224, 1024])
def test_the_pyramid_has_strides_four_to_sixty_four_patches_wide(size, patch):
    backbone = ViTDetBackbone(encoder(patch_size=patch), window_size=14, global_blocks=[1, 3]).eval()
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, size, size))
    grid = math.ceil(size / patch)  # the image is padded to the patch size
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    sides = [grid * 4, grid * 2, grid, grid // 2, math.ceil(grid // 2 / 2)]
    assert [tuple(m.shape) for m in maps.values()] == [(1, 256, s, s) for s in sides]
    assert backbone.out_channels == 256
    if size == 224:  # the strides in pixels: the patch size times 1/4, 1/2, 1 and 2 (224 / 16: a 14-cell grid)
        assert [size / m.shape[-1] for m in list(maps.values())[:4]] == pytest.approx([patch / 4, patch / 2, patch, patch * 2])


def test_window_partition_round_trips_with_padding():
    x = torch.randn(2, 9, 11, 8)
    windows, padded = window_partition(x, 4)
    assert padded == (12, 12) and windows.shape == (2 * 9, 16, 8)
    torch.testing.assert_close(window_unpartition(windows, 4, padded, (9, 11)), x)
    # the first window is the top-left 4x4 square, row by row
    torch.testing.assert_close(windows[0], x[0, :4, :4].reshape(16, 8))


def test_window_attention_equals_global_attention_when_the_window_is_the_grid():
    vit = encoder()
    images = torch.randn(2, 3, 224, 224)
    windowed = ViTDetBackbone(vit, window_size=14).eval()  # 224 / 16 = a 14x14 grid: one window
    plain = ViTDetBackbone(vit, window_size=0).eval()
    plain.pyramid.load_state_dict(windowed.pyramid.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(windowed.patch_features(images), plain.patch_features(images))
        for a, b in zip(windowed(images).values(), plain(images).values()):
            torch.testing.assert_close(a, b)


def test_a_windowed_block_attends_within_each_window_only():
    block = encoder().blocks[0]
    x = torch.randn(1, 6, 6, 64)
    with torch.no_grad():
        got = windowed_block(block, x, 3)
        # independently: each 3x3 window's tokens through the attention branch alone, then the MLP branch
        want = torch.empty_like(x)
        for top in (0, 3):
            for left in (0, 3):
                part = x[:, top:top + 3, left:left + 3].reshape(1, 9, 64)
                y = part + block.attn(block.norm1(part))
                want[:, top:top + 3, left:left + 3] = (y + block.mlp(block.norm2(y))).reshape(1, 3, 3, 64)
    torch.testing.assert_close(got, want)


def test_windows_pad_with_zeros_after_the_norm_as_vitdet_does():
    block = encoder().blocks[0]
    x = torch.randn(1, 5, 5, 64)
    with torch.no_grad():
        got = windowed_block(block, x, 3)
        # the bottom-right window holds 2x2 real tokens and 5 zero rows among its keys and values
        normed = torch.zeros(1, 3, 3, 64)
        normed[:, :2, :2] = block.norm1(x[:, 3:, 3:])
        attended = block.attn(normed.reshape(1, 9, 64)).reshape(1, 3, 3, 64)[:, :2, :2]
        y = x[:, 3:, 3:] + attended
        want = y + block.mlp(block.norm2(y))
    torch.testing.assert_close(got[:, 3:, 3:], want)


def test_global_blocks_attend_across_windows():
    vit = encoder(img_size=64)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        all_windowed = ViTDetBackbone(vit, window_size=2).patch_features(images)
        some_global = ViTDetBackbone(vit, window_size=2, global_blocks=[-1]).patch_features(images)
        changed = images.clone()
        changed[..., :16, :16] += 1.0  # the top-left window only
        far = (slice(None), slice(None), slice(2, None), slice(2, None))
        # without a global block the other windows do not see the change; with one they do
        assert torch.equal(ViTDetBackbone(vit, window_size=2).patch_features(changed)[far], all_windowed[far])
        assert not torch.allclose(ViTDetBackbone(vit, window_size=2, global_blocks=[-1]).patch_features(changed)[far],
                                  some_global[far])


def test_rotary_encoders_refuse_windows_and_work_globally():
    torch.manual_seed(0)
    eva = Eva(img_size=32, patch_size=4, num_classes=0, embed_dim=32, depth=2, num_heads=2).eval()
    with pytest.raises(VitError, match="window attention is for ViT encoders"):
        ViTDetBackbone(eva, window_size=4)
    backbone = ViTDetBackbone(eva).eval()
    images = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(backbone.patch_features(images),
                                   eva.forward_intermediates(images, indices=1, intermediates_only=True)[0])
        assert backbone(images)["2"].shape == (1, 256, 8, 8)


def test_torchvision_faster_rcnn_trains_and_detects_on_the_backbone():
    torch.manual_seed(0)
    backbone = ViTDetBackbone(encoder(img_size=64, patch_size=8), window_size=4, global_blocks=[-1])
    detector = FasterRCNN(backbone, num_classes=3, min_size=64, max_size=64, size_divisible=16)
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 8.0, 50.0, 30.0], [0.0, 0.0, 12.0, 12.0]]), "labels": torch.tensor([2, 1])}]
    losses = detector.train()(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert backbone.encoder.patch_embed.proj.weight.grad.abs().sum() > 0  # the encoder learns through the pyramid
    with torch.no_grad():
        out = detector.eval()(images)
    assert len(out) == 2 and all(set(o) == {"boxes", "labels", "scores"} for o in out)


def _target(boxes, labels, **extra):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels), **extra}


def _prediction(boxes, labels, scores):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "labels": torch.tensor(labels, dtype=torch.int64),
            "scores": torch.tensor(scores, dtype=torch.float32)}


def test_coco_ap_of_a_perfect_and_of_a_shifted_prediction():
    truth = [_target([[0.0, 0.0, 100.0, 100.0]], [1])]
    perfect = CocoAP()
    perfect.update([_prediction([[0.0, 0.0, 100.0, 100.0]], [1], [0.9])], truth)
    assert perfect.results()["ap"] == pytest.approx(1.0)
    shifted = CocoAP()  # 20 px to the right: IoU 80 / 120 = 0.67, a match at IoU .50, .55, .60 and .65 of ten
    shifted.update([_prediction([[20.0, 0.0, 120.0, 100.0]], [1], [0.9])], truth)
    got = shifted.results()
    assert got["ap"] == pytest.approx(0.4) and got["ap50"] == pytest.approx(1.0) and got["ap75"] == 0.0
    assert got["ap_large"] == pytest.approx(0.4) and got["ap_small"] is None and got["ap_medium"] is None


def test_coco_ap_equals_pycocotools_on_its_own_files(tmp_path):
    """A hand-made set with misses, false alarms, a crowd region and three sizes, judged by CocoAP and by
    pycocotools reading the ground truth and results as the JSON files COCO ships."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    truth = [_target([[10, 10, 30, 30], [50, 50, 150, 140], [0, 0, 60, 40]], [1, 2, 1], iscrowd=torch.tensor([0, 0, 1])),
             _target([[5, 5, 15, 25], [100, 20, 200, 220]], [3, 2]),
             _target([[30, 30, 90, 80]], [1])]
    predicted = [_prediction([[11, 9, 31, 30], [48, 55, 150, 150], [0, 0, 50, 40], [200, 200, 220, 220]], [1, 2, 1, 1], [0.9, 0.8, 0.7, 0.6]),
                 _prediction([[5, 5, 16, 24], [100, 20, 200, 220], [100, 20, 200, 220]], [3, 1, 2], [0.3, 0.95, 0.5]),
                 _prediction([], [], [])]
    ours = CocoAP()
    ours.update(predicted[:2], truth[:2])
    ours.update(predicted[2:], truth[2:])
    got = ours.results()

    def xywh(b):
        return [b[0], b[1], b[2] - b[0], b[3] - b[1]]
    images, annotations, results = [], [], []
    for i, (t, p) in enumerate(zip(truth, predicted), start=1):
        images.append({"id": i, "width": 256, "height": 256, "file_name": f"{i}.png"})
        crowd = t.get("iscrowd", torch.zeros(len(t["labels"]), dtype=torch.int64))
        for box, label, c in zip(t["boxes"].tolist(), t["labels"].tolist(), crowd.tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": label, "bbox": xywh(box),
                                "area": xywh(box)[2] * xywh(box)[3], "iscrowd": c})
        results += [{"image_id": i, "category_id": label, "bbox": xywh(box), "score": score}
                    for box, label, score in zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist())]
    (tmp_path / "instances_val.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                             "categories": [{"id": c, "name": str(c)} for c in (1, 2, 3)]}))
    (tmp_path / "results.json").write_text(json.dumps(results))
    coco = COCO(str(tmp_path / "instances_val.json"))
    judge = COCOeval(coco, coco.loadRes(str(tmp_path / "results.json")), "bbox")
    judge.evaluate()
    judge.accumulate()
    judge.summarize()
    want = [None if v < 0 else v for v in judge.stats[:6]]
    assert [got[k] for k in STAT_KEYS] == pytest.approx(want)
    assert 0 < got["ap"] < 1 and got["num_images"] == 3


def test_coco_ap_merges_another_process_records():
    a, b, whole = CocoAP(), CocoAP(), CocoAP()
    first = ([_prediction([[0, 0, 10, 10]], [1], [0.9])], [_target([[0, 0, 10, 12]], [1])])
    second = ([_prediction([[5, 5, 40, 40]], [2], [0.8])], [_target([[0, 0, 40, 40]], [2])])
    a.update(*first)
    b.update(*second)
    whole.update(*first)
    whole.update(*second)
    a.merge(b.state())
    assert a.results() == whole.results()


@pytest.mark.parametrize("kind", DETECTORS)
def test_each_torchvision_detector_trains_and_detects_on_a_vit(kind):
    torch.manual_seed(0)
    vit = encoder(img_size=64, patch_size=8)
    spec = DetectorSpec(kind=kind, num_classes=4, size=64, window_size=4, global_blocks=(-1,), channels=32)
    detector = Detector(vit, spec)
    assert detector.encoder is vit and not vit.norm.weight.requires_grad  # the classifier's final norm is unused
    assert level_strides(vit, spec.scale_factors) == [2.0, 4.0, 8.0, 16.0, 32.0]
    images = [torch.rand(3, 64, 64), torch.rand(3, 40, 56)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 8.0, 50.0, 30.0], [0.0, 0.0, 12.0, 12.0]]), "labels": torch.tensor([3, 2])}]
    if detector.masks:  # Mask R-CNN learns each object's mask too: here, its box filled
        for image, target in zip(images, targets):
            target["masks"] = torch.zeros(len(target["boxes"]), *image.shape[-2:], dtype=torch.uint8)
            for mask, (x0, y0, x1, y1) in zip(target["masks"], target["boxes"].int().tolist()):
                mask[y0:y1, x0:x1] = 1
    losses = detector.train()(images, targets)
    total = sum(losses.values())
    assert torch.isfinite(total) and len(losses) >= 2
    total.backward()
    unused = [n for n, p in detector.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused  # every parameter learns (DDP needs that)
    with torch.no_grad():
        found = detector.eval()(images)
    for image, out in zip(images, found):  # boxes come back in the image's own coordinates
        assert out["boxes"].shape[1] == 4 and (out["boxes"][:, 2] <= image.shape[-1] + 1e-3).all()
        assert (out["labels"] > 0).all()  # label 0 is the background, never a detection
        assert (out["boxes"][:, 3] <= image.shape[-2] + 1e-3).all()


def test_detector_args_reach_torchvision_and_the_checkpoint_and_unknown_ones_are_refused(tmp_path):
    spec = DetectorSpec(num_classes=3, size=64, channels=32, extra={"rpn_post_nms_top_n_test": 7, "box_batch_size_per_image": 16})
    detector = Detector(encoder(img_size=64, patch_size=8), spec).eval()
    assert detector.detector.rpn._post_nms_top_n["testing"] == 7
    assert detector.detector.roi_heads.fg_bg_sampler.batch_size_per_image == 16
    save_state_dict(tmp_path / "m.safetensors", detector.state_dict(), meta_for_model(detector))
    back, _ = model_from_checkpoint(str(tmp_path / "m.safetensors"))
    assert back.detector.rpn._post_nms_top_n["testing"] == 7
    for bad in ({"rpn_post_nms_top_n": 3}, {"min_size": 10}):
        with pytest.raises(VitError, match="detector_args"):
            Detector(encoder(img_size=64, patch_size=8), DetectorSpec(num_classes=3, size=64, channels=32, extra=bad))


def test_fcos_needs_channels_its_group_norm_divides():
    with pytest.raises(VitError, match="multiple of 32"):
        Detector(encoder(img_size=64, patch_size=8), DetectorSpec(kind="fcos", num_classes=3, size=64, channels=16))


def test_layer_decay_groups_follow_the_encoder_depth():
    detector = Detector(encoder(img_size=64, patch_size=8), DetectorSpec(num_classes=3, size=64, channels=32))
    groups = param_groups_layer_decay(detector, weight_decay=0.05, layer_decay=0.5, no_weight_decay_list=detector.no_weight_decay())
    scales = {}
    for group in groups:
        for p in group["params"]:
            scales[id(p)] = group["lr_scale"]
    named = dict(detector.named_parameters())
    depth = len(detector.blocks)
    assert scales[id(named["detector.backbone.encoder.patch_embed.proj.weight"])] == pytest.approx(0.5 ** (depth + 1))
    assert scales[id(named["detector.backbone.encoder.blocks.0.attn.qkv.weight"])] == pytest.approx(0.5 ** depth)
    assert scales[id(named[f"detector.backbone.encoder.blocks.{depth - 1}.mlp.fc2.weight"])] == pytest.approx(0.5)
    assert scales[id(named["detector.roi_heads.box_predictor.cls_score.weight"])] == pytest.approx(1.0)


def test_a_detector_checkpoint_round_trips_and_adapts(tmp_path):
    torch.manual_seed(0)
    spec = DetectorSpec(kind="fcos", num_classes=4, size=64, window_size=4, global_blocks=(-1,), channels=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    detector = Detector(encoder(img_size=64, patch_size=8), spec).eval()
    meta = meta_for_model(detector, CheckpointMeta(model="", model_args={}, class_names=["a", "b", "c"]), step=3)
    assert (meta.task, meta.num_classes, meta.class_names, meta.detector["kind"]) == ("detection", 4, ["a", "b", "c"], "fcos")
    save_state_dict(tmp_path / "model.safetensors", detector.state_dict(), meta.replace(preprocess=Preprocessing((0.5,) * 3, (0.25,) * 3)))
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 40)]
    back, _ = model_from_checkpoint(str(tmp_path / "model.safetensors"))
    assert isinstance(back, Detector) and back.spec == spec
    with torch.no_grad():
        for a, b in zip(detector(images), back(images)):
            for key in ("boxes", "scores", "labels"):
                torch.testing.assert_close(a[key], b[key])
    other, ck = model_from_checkpoint(str(tmp_path / "model.safetensors"), num_classes=7)
    assert other.num_classes == 7 and any("replaced" in n for n in ck.notes)
    torch.testing.assert_close(other.detector.backbone.pyramid.state_dict()["stages.0.1.weight"],
                               detector.detector.backbone.pyramid.state_dict()["stages.0.1.weight"])


def test_the_detection_objective_sums_the_detectors_losses_and_scores_by_coco_ap():
    torch.manual_seed(0)
    detector = Detector(encoder(img_size=64, patch_size=8), DetectorSpec(num_classes=3, size=64, channels=32))
    objective = build_objective(ObjectiveCfg(name="detection"), detector, Inputs(num_classes=3))
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 8.0, 50.0, 30.0]]), "labels": torch.tensor([2])}]
    detector.train()
    torch.manual_seed(1)  # the RPN and RoI heads sample proposals at random
    loss, parts = objective((images, targets))
    torch.manual_seed(1)
    direct = detector(images, targets)
    torch.testing.assert_close(loss, sum(direct.values()))
    assert set(parts) == set(direct)
    batches = [(images[:1], targets[:1]), (images[1:], targets[1:])]
    got = objective.evaluate(detector, batches, torch.device("cpu"), None)
    assert detector.training  # evaluation restores the mode it found
    judge = CocoAP()
    with torch.no_grad():
        judge.update(detector.eval()(images), targets)
    want = judge.results()
    assert {k: got[k] for k in STAT_KEYS} == pytest.approx({k: want[k] for k in STAT_KEYS})
    assert got["num_images"] == 2 and objective.score(got) == (got["ap"] or 0.0)


@pytest.mark.parametrize("kind", DETECTORS)
def test_each_detector_exports_to_onnx_and_matches_in_onnxruntime(kind, tmp_path):
    from vitcli.export.detector import export_detector
    from vitcli.models.load import LoadedCheckpoint

    torch.manual_seed(0)
    spec = DetectorSpec(kind=kind, num_classes=4, size=64, channels=32, window_size=4, global_blocks=(-1,), score_thresh=0.0,
                        detections_per_img=20)
    detector = Detector(encoder(img_size=64, patch_size=8), spec).eval()
    if kind == "retinanet":  # its prior (every class at 0.01) leaves an untrained head's top candidates to the background
        with torch.no_grad():
            detector.detector.head.classification_head.cls_logits.bias.view(-1, 4).copy_(torch.tensor([-10.0, 0.0, 0.0, 0.0]))
    ck = LoadedCheckpoint(state_dict={}, meta=meta_for_model(detector), source="test")
    report = export_detector(detector, ck, "onnx", tmp_path / f"{kind}.onnx")
    assert report["verified"] and report["max_abs_diff"] < 1e-3
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / f"{kind}.onnx"), providers=["CPUExecutionProvider"])
    image = torch.rand(3, 64, 64)
    boxes, scores, labels, *masks = session.run(None, {"image": image.numpy()})
    assert boxes.shape == (len(scores), 4) and len(labels) == len(scores) > 0 and (labels > 0).all()
    with torch.no_grad():
        want = detector([image])[0]
    torch.testing.assert_close(torch.from_numpy(scores), want["scores"], atol=1e-4, rtol=0)
    if detector.masks:
        torch.testing.assert_close(torch.from_numpy(masks[0]), want["masks"], atol=1e-4, rtol=0)
