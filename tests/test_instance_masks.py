"""Instance masks (Mask R-CNN): COCO's polygons and RLE read as pycocotools draws them, digits-det's masks against
its own ink, masks that follow their boxes through large-scale jitter, mask AP against pycocotools' COCOeval
"segm" on its own files, and Mask R-CNN end to end (finetune, eval against pycocotools, predict, ONNX, shards)."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import masks_to_boxes

from helpers import offline_env, run_cli, write_coco_digits
from vitcli.data import builtin
from vitcli.data.boxes import decode_objects, has_masks
from vitcli.data.det_sources import load_box_split
from vitcli.data.det_transforms import DetTransform, DetTransformSpec
from vitcli.models.adapt import model_from_checkpoint
from vitcli.models.detector import Detector, DetectorSpec
from vitcli.models.vit import VisionTransformer
from vitcli.objectives.coco_metrics import MASK_KEYS, STAT_KEYS, CocoAP


def _coco_file(root, images, annotations, categories=(1, 2), split="val"):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations,
                                "categories": [{"id": c, "name": f"c{c}"} for c in categories]}))
    return path


def test_coco_polygons_and_rle_become_the_masks_pycocotools_draws(tmp_path):
    (tmp_path / "val").mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(tmp_path / "val" / name)
    blob = np.zeros((30, 40), dtype=np.uint8)
    blob[5:12, 20:33] = 1
    compressed = coco_mask.encode(np.asfortranarray(blob))
    crowd = np.zeros((30, 40), dtype=np.uint8)
    crowd[20:28, 2:9] = 1
    runs = [len(list(g)) for _, g in __import__("itertools").groupby(crowd.flatten(order="F"))]  # uncompressed, from 0s
    annotations = [
        {"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 12], "iscrowd": 0, "segmentation": [[2, 3, 12, 3, 7, 15]]},
        {"id": 2, "image_id": 1, "category_id": 2, "bbox": [20, 2, 15, 20], "iscrowd": 0,
         "segmentation": [[20, 2, 26, 2, 26, 8, 20, 8], [28, 14, 35, 14, 35, 22]]},
        {"id": 3, "image_id": 1, "category_id": 1, "bbox": [2, 20, 7, 8], "iscrowd": 1, "segmentation": {"size": [30, 40], "counts": runs}},
        {"id": 4, "image_id": 2, "category_id": 2, "bbox": [20, 5, 13, 7], "iscrowd": 0,
         "segmentation": {"size": [30, 40], "counts": compressed["counts"].decode()}},
        {"id": 5, "image_id": 2, "category_id": 1, "bbox": [1.5, 2, 6, 4], "iscrowd": 0},  # no mask: its box stands for it
    ]
    images = [{"id": 1, "file_name": "a.png", "height": 30, "width": 40}, {"id": 2, "file_name": "b.png", "height": 30, "width": 40}]
    truth = COCO(str(_coco_file(tmp_path, images, annotations)))
    split = load_box_split(str(tmp_path), "val", role="eval", carve=False)
    assert has_masks(split.dataset)
    tf = DetTransform(DetTransformSpec(channels=3), train=False)
    for row, image_id in zip(split.dataset, (1, 2)):
        _, target = tf(row["image"], decode_objects(row["objects"]))
        anns = truth.loadAnns(truth.getAnnIds(imgIds=[image_id], iscrowd=None))
        assert target["masks"].shape == (len(anns), 30, 40) and target["masks"].dtype == torch.uint8
        for mask, ann in zip(target["masks"], anns):
            if "segmentation" in ann:
                want = truth.annToMask(ann)
            else:
                want = np.zeros((30, 40), dtype=np.uint8)
                want[2:6, 2:8] = 1  # the box 1.5..7.5 x 2..6, rounded to whole pixels
            np.testing.assert_array_equal(mask.numpy(), want)
    np.testing.assert_array_equal(coco_mask.decode(compressed), blob)  # the file's RLE is what the blob was


def test_a_save_to_disk_copy_with_segmentation_reads_its_masks(tmp_path):
    """The Hugging Face schema with a `segmentation` string per object (compressed RLE over the image)."""
    blob = np.zeros((16, 24), dtype=np.uint8)
    blob[3:9, 2:11] = 1
    counts = coco_mask.encode(np.asfortranarray(blob))["counts"].decode()
    features = datasets.Features({"image": datasets.Image(), "objects": datasets.Sequence(
        {"bbox": datasets.Sequence(datasets.Value("float32"), length=4), "category": datasets.Value("int64"),
         "segmentation": datasets.Value("string")})})
    image = Image.fromarray(np.zeros((16, 24, 3), dtype=np.uint8))
    rows = {"image": [image, image], "objects": [{"bbox": [[2, 3, 9, 6]], "category": [0], "segmentation": [counts]},
                                                 {"bbox": [], "category": [], "segmentation": []}]}
    split = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "masked"))
    val = load_box_split(str(tmp_path / "masked"), role="eval")
    assert has_masks(val.dataset)
    _, target = DetTransform(DetTransformSpec(channels=3), train=False)(val.dataset[0]["image"], decode_objects(val.dataset[0]["objects"]))
    np.testing.assert_array_equal(target["masks"][0].numpy(), blob)


def test_digits_det_masks_are_each_digits_ink_inside_its_tight_box():
    val = load_box_split("digits-det", role="eval")
    tf = DetTransform(DetTransformSpec(channels=1), train=False)
    for row in val.dataset.select(range(40)):
        ink = np.asarray(row["image"]) >= builtin.DIGITS_SEG_INK
        _, target = tf(row["image"], decode_objects(row["objects"]))
        masks = target["masks"].bool()
        assert masks.shape == (len(target["boxes"]), 64, 64) and masks.flatten(1).any(1).all()
        edges = masks_to_boxes(masks) + torch.tensor([0.0, 0.0, 1.0, 1.0])  # last pixel -> pixel edge
        torch.testing.assert_close(edges, target["boxes"])
        for mask, (x0, y0, x1, y1) in zip(masks.numpy(), target["boxes"].int().tolist()):
            np.testing.assert_array_equal(mask[y0:y1, x0:x1], ink[y0:y1, x0:x1])  # digits never overlap
        assert not (masks.any(0).numpy() ^ ink).any()  # every inked pixel belongs to exactly the masks


@pytest.mark.parametrize("seed", range(4))
def test_masks_follow_their_boxes_through_large_scale_jitter(seed):
    rows = load_box_split("digits-det", role="train").dataset.select(range(8))
    tf = DetTransform(DetTransformSpec(size=64, scale_range=(0.3, 2.0), channels=1), train=True)
    torch.manual_seed(seed)
    for row in rows:
        image, target = tf(row["image"], decode_objects(row["objects"]))
        masks, boxes = target["masks"].bool(), target["boxes"]
        assert masks.shape == (len(boxes), *image.shape[-2:]) and len(target["labels"]) == len(boxes)
        inked = masks.flatten(1).any(1)
        # a mask's pixels lie within its box (up to a nearest-neighbour pixel at the box's scaled edges)
        found = masks_to_boxes(masks[inked]) + torch.tensor([0.0, 0.0, 1.0, 1.0])
        assert (found[:, :2] >= boxes[inked, :2] - 1).all() and (found[:, 2:] <= boxes[inked, 2:] + 1).all()
        # a digit the crop left whole: its box is still the tight box of its mask
        whole = inked & (boxes[:, 0] > 0) & (boxes[:, 1] > 0) & (boxes[:, 2] < image.shape[-1]) & (boxes[:, 3] < image.shape[-2])
        if whole.any():
            tight = masks_to_boxes(masks[whole]) + torch.tensor([0.0, 0.0, 1.0, 1.0])
            assert (tight - boxes[whole]).abs().max() <= 1.5


def _square(h, w, y0, x0, side):
    m = np.zeros((h, w), dtype=np.uint8)
    m[y0:y0 + side, x0:x0 + side] = 1
    return m


def _records():
    """Two images' ground truth (with a crowd region) and predictions with masks that match, miss and overlap."""
    truth = [np.stack([_square(48, 64, 4, 4, 20), _square(48, 64, 30, 40, 10), _square(48, 64, 2, 40, 16)]),
             np.stack([_square(48, 64, 10, 10, 30)])]
    labels, crowd = [torch.tensor([1, 2, 1]), torch.tensor([2])], [torch.tensor([0, 0, 1]), torch.tensor([0])]
    notched = _square(48, 64, 5, 4, 20)
    notched[13:25, 12:24] = 0  # the same box, a third of the mask gone: mask IoU below box IoU
    hollow = _square(48, 64, 14, 14, 30)
    hollow[20:38, 20:38] = 0
    found = [np.stack([notched, _square(48, 64, 30, 38, 10), _square(48, 64, 3, 41, 14), _square(48, 64, 20, 0, 6)]),
             np.stack([hollow, _square(48, 64, 10, 10, 30)])]
    found_labels, scores = [torch.tensor([1, 2, 1, 2]), torch.tensor([2, 1])], [torch.tensor([0.9, 0.8, 0.7, 0.3]), torch.tensor([0.6, 0.5])]

    def box(m):
        return masks_to_boxes(torch.from_numpy(m).bool()) + torch.tensor([0.0, 0.0, 1.0, 1.0])

    targets = [{"boxes": box(t), "labels": lab, "iscrowd": c, "masks": torch.from_numpy(t)} for t, lab, c in zip(truth, labels, crowd)]
    preds = [{"boxes": box(f), "labels": lab, "scores": s, "masks": torch.from_numpy(f)[:, None].float() * 0.9}
             for f, lab, s in zip(found, found_labels, scores)]
    return preds, targets


def test_mask_ap_equals_pycocotools_segm_on_its_own_files(tmp_path):
    preds, targets = _records()
    judge = CocoAP()
    judge.update(preds, targets)
    got = judge.results()
    images, annotations, results = [], [], []
    for image_id, (pred, target) in enumerate(zip(preds, targets), start=1):
        images.append({"id": image_id, "height": 48, "width": 64})
        for mask, label, crowd in zip(target["masks"].numpy(), target["labels"].tolist(), target["iscrowd"].tolist()):
            rle = coco_mask.encode(np.asfortranarray(mask))
            x, y, w, h = coco_mask.toBbox(rle).tolist()
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label, "iscrowd": crowd,
                                "bbox": [x, y, w, h], "area": w * h, "segmentation": {"size": [48, 64], "counts": rle["counts"].decode()}})
        for mask, label, score in zip(pred["masks"][:, 0].numpy() > 0.5, pred["labels"].tolist(), pred["scores"].tolist()):
            rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
            results.append({"image_id": image_id, "category_id": label, "score": score,
                             "segmentation": {"size": [48, 64], "counts": rle["counts"].decode()}})
    truth_file, result_file = tmp_path / "truth.json", tmp_path / "results.json"
    truth_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1}, {"id": 2}]}))
    result_file.write_text(json.dumps(results))
    truth = COCO(str(truth_file))
    want = {}
    for kind, keys in (("bbox", STAT_KEYS), ("segm", MASK_KEYS)):
        found = truth.loadRes(str(result_file)) if kind == "segm" else truth.loadRes(
            [{**r, "bbox": coco_mask.toBbox(r["segmentation"]).tolist()} for r in json.loads(result_file.read_text())])
        e = COCOeval(truth, found, kind)
        e.evaluate()
        e.accumulate()
        e.summarize()
        want |= {k: None if v < 0 else v for k, v in zip(keys, e.stats[:6])}
    assert 0.2 < want["mask_ap"] < 0.9 and want["mask_ap"] != want["ap"]  # a telling case: neither perfect nor the boxes' AP
    assert {k: got[k] for k in want} == pytest.approx(want)
    perfect = CocoAP()
    perfect.update([{"boxes": t["boxes"], "labels": t["labels"], "scores": torch.ones(len(t["labels"])),
                     "masks": t["masks"][:, None].float()} for t in targets], targets)
    assert perfect.results()["mask_ap"] == pytest.approx(1.0)


def test_mask_ap_merges_another_process_records_and_is_left_out_without_masks():
    preds, targets = _records()
    a, b, whole = CocoAP(), CocoAP(), CocoAP()
    a.update(preds[:1], targets[:1])
    b.update(preds[1:], targets[1:])
    whole.update(preds, targets)
    a.merge(b.state())
    assert a.results() == whole.results() and "mask_ap" in whole.results()
    boxes_only = CocoAP()
    boxes_only.update([{k: v for k, v in p.items() if k != "masks"} for p in preds], targets)
    assert "mask_ap" not in boxes_only.results() and boxes_only.results()["ap"] == whole.results()["ap"]


def test_mask_rcnn_learns_masks_on_a_vit_with_a_mask_head_as_wide_as_the_pyramid():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=5)
    detector = Detector(vit, DetectorSpec(kind="mask_rcnn", num_classes=4, size=64, channels=32, score_thresh=0.0))
    heads = detector.detector.roi_heads
    assert detector.masks and heads.mask_head[0][0].in_channels == heads.mask_head[0][0].out_channels == 32
    target = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 40.0]]), "labels": torch.tensor([2]),
              "masks": torch.from_numpy(_square(64, 64, 4, 4, 26))[None]}
    losses = detector.train()([torch.rand(3, 64, 64)], [target])
    assert "loss_mask" in losses and torch.isfinite(sum(losses.values()))
    sum(losses.values()).backward()
    assert heads.mask_predictor.mask_fcn_logits.weight.grad.abs().sum() > 0
    with torch.no_grad():
        found = detector.eval()([torch.rand(3, 48, 40)])[0]
    assert found["masks"].shape[1:] == (1, 48, 40) and len(found["masks"]) == len(found["boxes"])  # pasted into the image


def test_objects_are_drawn_with_their_masks_under_their_boxes_in_their_labels_colour():
    from vitcli.data.box_pictures import COLOURS, draw_objects

    black = torch.zeros(1, 40, 40, dtype=torch.uint8)  # grey: drawn as RGB
    mask = torch.zeros(1, 40, 40, dtype=torch.bool)
    mask[0, 12:20, 10:30] = True
    picture = draw_objects(black, torch.tensor([[5.0, 8.0, 35.0, 30.0]]), torch.tensor([3]), ["x"], mask)
    colour = torch.tensor([int(COLOURS[2][i:i + 2], 16) for i in (1, 3, 5)], dtype=torch.float32)  # label 3: the third
    assert picture.shape == (3, 40, 40)
    torch.testing.assert_close(picture[:, 15, 20].float(), (colour * 0.5).floor(), atol=1, rtol=0)  # the mask at alpha 0.5
    assert torch.equal(picture[:, 20, 35].float(), colour)  # the box's right edge
    assert picture[:, 35, 20].sum() == 0 and picture[:, 20, 20].sum() == 0  # outside the box; inside it, outside the mask


@pytest.fixture(scope="module")
def coco_instances(tmp_path_factory):
    """A COCO folder of digits-det canvases whose annotations carry each digit's mask as compressed RLE."""
    return write_coco_digits(tmp_path_factory.mktemp("coco_masks"), [c + 1 for c in range(10)], masks=True)


SMALL = ["--res", "32", "--set", "model.pyramid_scales=[1.0, 0.5]", "--set", "model.pyramid_channels=32", "--set", "train.batch_size=4",
         "--set", "train.epochs=null", "--set", "data.num_workers=0", "--set", "model.score_thresh=0.0",
         "--set", "model.detector_args={box_batch_size_per_image: 32, rpn_post_nms_top_n_train: 100}"]


@pytest.mark.slow
def test_mask_rcnn_finetunes_and_its_mask_ap_equals_pycocotools(trained, coco_instances, tmp_path, capsys):
    out = tmp_path / "run"
    with offline_env():
        assert run_cli("finetune", "--ckpt", str(trained), "--task", "detection", "--dataset", str(coco_instances),
                       "--detector", "mask_rcnn", "--out", str(out), *SMALL, "--set", "train.steps=6", "--set", "train.eval_every=6") == 0
        assert run_cli("eval", "--ckpt", str(out), "--json", "--num-workers", "0") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["detector"] == "mask_rcnn" and result["num_images"] == 8 and set(MASK_KEYS) <= set(result)
    # by hand: the checkpoint's masks on each val image, judged by pycocotools against the folder's own file
    model, _ = model_from_checkpoint(out)
    truth = COCO(str(coco_instances / "annotations" / "instances_val.json"))
    tf = DetTransform(DetTransformSpec(channels=3), train=False)
    found = []
    with torch.no_grad():
        for image_id, info in truth.imgs.items():
            x, _ = tf(Image.open(coco_instances / "val" / info["file_name"]), {})
            detected = model([x])[0]
            for mask, score, label in zip(detected["masks"][:, 0] > 0.5, detected["scores"].tolist(), detected["labels"].tolist()):
                rle = coco_mask.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
                found.append({"image_id": image_id, "category_id": label, "score": score,
                              "segmentation": {"size": [64, 64], "counts": rle["counts"].decode()}})
    assert len(found) >= 8
    judge = COCOeval(truth, truth.loadRes(found), "segm")
    judge.evaluate()
    judge.accumulate()
    judge.summarize()
    assert [result[k] for k in MASK_KEYS] == pytest.approx([None if v < 0 else v for v in judge.stats[:6]], abs=1e-6)
    # predict: each object's mask as COCO RLE that pycocotools decodes to the image's size; --draw paints them
    path = coco_instances / "val" / "val_000.png"
    capsys.readouterr()  # pycocotools' prints
    assert run_cli("predict", "--ckpt", str(out), str(path), "--json", "--score-thresh", "0.0", "--draw", str(tmp_path / "drawn")) == 0
    row = json.loads(capsys.readouterr().out)[0]
    with torch.no_grad():
        want = model([tf(Image.open(path), {})[0]])[0]
    assert len(row["objects"]) == len(want["masks"]) > 0
    for o, mask in zip(row["objects"], want["masks"][:, 0] > 0.5):
        np.testing.assert_array_equal(coco_mask.decode({**o["mask"], "counts": o["mask"]["counts"].encode()}), mask.numpy())
    assert Image.open(row["drawn"]).size == (64, 64)
    # inspect: the encoder's figures, then the set's objects beside the detections
    assert run_cli("inspect", "--ckpt", str(out), "--out", str(tmp_path / "inspect"), "--show", "2") == 0
    summary = json.loads((tmp_path / "inspect" / "inspect.json").read_text())
    assert summary["num_images"] == 2 and Image.open(summary["figures"]["detection"]).size[1] > 200
    assert "detection: annotated and detected objects" in capsys.readouterr().out
    # ONNX: the masks come out too, as onnxruntime computes them
    assert run_cli("export", "--ckpt", str(out), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--json") == 0
    assert json.loads(capsys.readouterr().out)["verified"]
    import onnxruntime as ort

    x, _ = tf(Image.open(path).resize((32, 32)), {})
    boxes, scores, labels, masks = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})
    with torch.no_grad():
        want = model([x])[0]
    assert masks.shape == (len(scores), 1, 32, 32) and labels.tolist() == want["labels"].tolist()
    torch.testing.assert_close(torch.from_numpy(masks), want["masks"], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_mask_rcnn_on_a_set_without_masks_is_refused_with_what_to_do(trained, tmp_path, capsys):
    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(tmp_path / split / "a.png")
        _coco_file(tmp_path, [{"id": 1, "file_name": "a.png", "height": 32, "width": 32}],
                   [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 9, 9], "iscrowd": 0}], split=split)
    with offline_env():
        code = run_cli("finetune", "--ckpt", str(trained), "--task", "detection", "--dataset", str(tmp_path), "--detector", "mask_rcnn",
                       "--out", str(tmp_path / "run"), *SMALL, "--set", "train.steps=2")
    err = capsys.readouterr().err
    assert code == 2 and "boxes only" in err and "--detector faster_rcnn" in err and "Traceback" not in err
