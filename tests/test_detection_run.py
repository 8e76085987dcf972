"""Detection end to end: `vit finetune --task detection` on a COCO folder the test writes (from digits-det), `vit
eval --json` against pycocotools reading that folder's own annotation file, and an exact resume after SIGTERM."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from helpers import offline_env, recipe_file, run_cli, sigterm_then_resume_matches_an_uninterrupted_run, write_coco_digits
from vitcli.data import builtin
from vitcli.data.boxes import decode_objects
from vitcli.data.det_transforms import DetTransform, DetTransformSpec
from vitcli.io.checkpoint import read_state
from vitcli.models.adapt import model_from_checkpoint
from vitcli.models.detector import Detector
from vitcli.models.load import load_checkpoint

SMALL = ["--set", "model.pyramid_scales=[2.0, 1.0, 0.5]", "--set", "model.pyramid_channels=32", "--set", "train.batch_size=4",
         "--set", "train.epochs=null", "--set", "data.num_workers=0", "--set", "data.resize_range=[0.5, 1.5]"]
CATEGORY_IDS = [11 + 2 * c for c in range(10)]  # COCO's ids are not 0..K-1: digit c is category 11 + 2c


@pytest.fixture(scope="module")
def coco_digits(tmp_path_factory):
    """A COCO folder (annotations/instances_{train,val}.json over train/ and val/) of digits-det canvases."""
    return write_coco_digits(tmp_path_factory.mktemp("coco"), CATEGORY_IDS)


@pytest.fixture(scope="module")
def det_run(trained, coco_digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("det") / "run"
    with offline_env():
        assert run_cli("finetune", "--ckpt", str(trained), "--task", "detection", "--dataset", str(coco_digits), "--res", "32",
                       "--detector", "fcos", "--out", str(out), *SMALL, "--set", "train.steps=6", "--set", "train.eval_every=6",
                       "--set", "model.score_thresh=0.0") == 0  # keep even an untrained detector's boxes: there is something to judge
    return out


@pytest.mark.slow
def test_finetune_detects_and_eval_equals_pycocotools_on_the_sets_own_file(det_run, coco_digits, capsys):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    meta = load_checkpoint(det_run).meta
    assert (meta.task, meta.num_classes, meta.detector["kind"], meta.class_names) == ("detection", 11, "fcos", [str(d) for d in range(10)])
    assert json.loads((det_run / "summary.json").read_text())["best_metric"] == "ap"
    assert run_cli("eval", "--ckpt", str(det_run), "--json", "--num-workers", "0", "--batch-size", "3") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "detection" and result["num_images"] == 8
    # by hand: the checkpoint's detections on each val image, back in COCO's category ids, judged by pycocotools
    model, _ = model_from_checkpoint(det_run)
    assert isinstance(model, Detector)
    truth = COCO(str(coco_digits / "annotations" / "instances_val.json"))
    tf = DetTransform(DetTransformSpec(channels=3), train=False)
    found = []
    from PIL import Image
    with torch.no_grad():
        for image_id, info in truth.imgs.items():
            x, _ = tf(Image.open(coco_digits / "val" / info["file_name"]), {})
            out = model([x])[0]
            for (x0, y0, x1, y1), score, label in zip(out["boxes"].tolist(), out["scores"].tolist(), out["labels"].tolist()):
                found.append({"image_id": image_id, "category_id": CATEGORY_IDS[label - 1], "bbox": [x0, y0, x1 - x0, y1 - y0],
                              "score": score})
    keys = ("ap", "ap50", "ap75", "ap_small", "ap_medium", "ap_large")
    assert len(found) >= 8
    judge = COCOeval(truth, truth.loadRes(found), "bbox")
    judge.evaluate()
    judge.accumulate()
    judge.summarize()
    assert [result[k] for k in keys] == pytest.approx([None if v < 0 else v for v in judge.stats[:6]], abs=1e-6)


@pytest.mark.slow
def test_detection_resumes_exactly_after_sigterm(coco_digits, tmp_path):
    recipe = recipe_file(tmp_path, f"task: detection\nmodel: {{name: vit_pico, img_size: 32, patch_size: 4, window_size: 2, "
                                   f"global_blocks: [-1]}}\ndata: {{dataset: {coco_digits}}}\ntrain: {{steps: 16, eval_every: 8, log_every: 2}}\n")
    with offline_env():
        full = sigterm_then_resume_matches_an_uninterrupted_run(tmp_path, SMALL, recipe, steps=16, cut_at=4)
    assert any(e.get("ap") is not None for e in full)


@pytest.mark.slow
def test_predict_lists_and_draws_each_images_boxes(det_run, coco_digits, tmp_path, capsys):
    from PIL import Image

    images = [coco_digits / "val" / "val_000.png", coco_digits / "val" / "val_001.png"]
    drawn = tmp_path / "drawn"
    assert run_cli("predict", "--ckpt", str(det_run), *map(str, images), "--json", "--score-thresh", "0.05", "--draw", str(drawn)) == 0
    rows = json.loads(capsys.readouterr().out)
    model, _ = model_from_checkpoint(det_run)
    tf = DetTransform(DetTransformSpec(channels=3), train=False)
    for row, path in zip(rows, images):
        assert row["path"] == str(path)
        with torch.no_grad():
            want = model([tf(Image.open(path), {})[0]])[0]
        keep = want["scores"] >= 0.05
        assert [o["score"] for o in row["objects"]] == pytest.approx(want["scores"][keep].tolist(), abs=1e-5)
        torch.testing.assert_close(torch.tensor([o["box"] for o in row["objects"]]).reshape(-1, 4), want["boxes"][keep], atol=0.01, rtol=0)
        assert [o["index"] + 1 for o in row["objects"]] == want["labels"][keep].tolist()
        assert all(o["label"] == str(o["index"]) for o in row["objects"])
        assert Image.open(row["drawn"]).size == Image.open(path).size
    assert run_cli("predict", "--ckpt", str(det_run), str(images[0]), "--csv", str(tmp_path / "x.csv")) == 2
    assert "--json" in capsys.readouterr().err


@pytest.mark.slow
def test_onnx_export_of_a_detector_runs_in_onnxruntime(det_run, coco_digits, tmp_path, capsys):
    import onnxruntime as ort
    from PIL import Image

    out = tmp_path / "detector.onnx"
    assert run_cli("export", "--ckpt", str(det_run), "--format", "onnx", "--out", str(out), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verified"] and report["task"] == "detection" and report["img_size"] == [32, 32]
    # a real canvas at the detector's size, through onnxruntime and through PyTorch
    model, _ = model_from_checkpoint(det_run)
    image = Image.open(coco_digits / "val" / "val_002.png").resize((32, 32))
    x, _ = DetTransform(DetTransformSpec(channels=3), train=False)(image, {})
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    boxes, scores, labels = session.run(None, {"image": x.numpy()})
    with torch.no_grad():
        want = model([x])[0]
    assert labels.tolist() == want["labels"].tolist() and len(labels) > 0
    torch.testing.assert_close(torch.from_numpy(boxes), want["boxes"], atol=1e-3, rtol=0)
    torch.testing.assert_close(torch.from_numpy(scores), want["scores"], atol=1e-4, rtol=0)
    assert run_cli("export", "--ckpt", str(det_run), "--format", "exported-program", "--out", str(tmp_path / "d.pt2")) == 2
    assert "onnx or vitcli" in capsys.readouterr().err


@pytest.mark.slow
def test_tar_shards_of_boxes_hold_the_set_and_train_and_score_alike(det_run, trained, tmp_path, capsys):
    """`vit shards digits-det` writes KEY.png + KEY.json {"objects": ...}; read back, the split equals the set
    (image bytes and boxes); `vit eval` scores a checkpoint the same on both; a fine-tune streams the shards."""
    from vitcli.data.det_sources import load_box_split

    shards = tmp_path / "shards"
    with offline_env():
        assert run_cli("shards", "digits-det", str(shards), "--samples-per-shard", "300") == 0
    index = json.loads((shards / "index.json").read_text())
    assert index["task"] == "detection" and index["classes"] == builtin.DIGITS_CLASSES and len(index["splits"]["train"]["shards"]) == 7
    assert index["instance_masks"]  # digits-det's objects carry their masks
    encoded = datasets.Image(decode=False)
    source = builtin.digits_det_splits()["val"].cast_column("image", encoded)
    back = load_box_split(str(shards), role="eval").dataset.cast_column("image", encoded)
    assert len(back) == len(source) == 500
    for a, b in ((source[i], back[i]) for i in (0, 1, 250, 499)):
        assert a["image"]["bytes"] == b["image"]["bytes"]
        assert a["objects"]["bbox"] == b["objects"]["bbox"] and a["objects"]["category"] == b["objects"]["category"]
        assert a["objects"]["segmentation"] == b["objects"]["segmentation"]
    capsys.readouterr()
    scores = []
    for dataset in ("digits-det", str(shards)):
        with offline_env():
            assert run_cli("eval", "--ckpt", str(det_run), "--dataset", dataset, "--json") == 0
        scores.append(json.loads(capsys.readouterr().out))
    assert scores[0]["ap"] == scores[1]["ap"] and scores[0]["ap50"] == scores[1]["ap50"] and scores[0]["num_images"] == 500
    with offline_env():
        assert run_cli("finetune", "--ckpt", str(trained), "--task", "detection", "--dataset", str(shards), "--res", "32",
                       "--detector", "fcos", "--out", str(tmp_path / "run"), *SMALL, "--set", "train.steps=2",
                       "--set", "train.eval_every=2", "--set", "data.eval_subset=8") == 0
    assert load_checkpoint(tmp_path / "run").meta.class_names == builtin.DIGITS_CLASSES
    state = read_state(next((tmp_path / "run" / "checkpoints").glob("step-*/state.pt")))
    assert state["data_per_rank"][0]["readers"] == 1  # the training split streamed: its position is saved


def test_a_detection_stream_holds_the_shards_objects_and_resumes_exactly(tmp_path):
    """The training split of detection shards streams: one epoch's boxes (deterministic transform, buffer 1:
    all but the one sample still in the buffer) are the set's own, masks included; a restored stream gives the
    same images and targets as one that ran on."""
    from collections import Counter

    from vitcli.data.det_sources import load_box_split
    from vitcli.data.shard_sets import stream_split
    from vitcli.data.specs import LoaderSpec
    from vitcli.data.stream_loader import make_stream_loader

    shards = tmp_path / "shards"
    with offline_env():
        assert run_cli("shards", "digits-det", str(shards), "--samples-per-shard", "400") == 0
    train = stream_split(str(shards), None)
    assert (train.task, train.instance_masks, len(train)) == ("detection", True, 2000)

    def objects(target):  # the boxes, labels and masks of one image, as a sortable record
        return (target["boxes"].round(decimals=3).tolist(), target["labels"].tolist(), [m.sum().item() for m in target["masks"]])

    fixed = DetTransform(DetTransformSpec(size=64, channels=1), train=False)
    streamed = []
    for _, targets in make_stream_loader(train, fixed, LoaderSpec.training(100, seed=0), buffer=1):
        streamed += [objects(t) for t in targets]
        if len(streamed) >= len(train) - 1:
            break
    source = load_box_split("digits-det", role="train").dataset
    want = Counter(repr(objects(fixed(row["image"], decode_objects(row["objects"]))[1])) for row in source)
    left = want - Counter(repr(o) for o in streamed[:len(train) - 1])
    assert sum(left.values()) == 1 and sum(want.values()) == 2000

    jittered = DetTransform(DetTransformSpec(size=32, scale_range=(0.5, 1.5), hflip=0.5, channels=1), train=True)

    def loader():
        return make_stream_loader(train, jittered, LoaderSpec.training(4, seed=1), buffer=16)

    def batches(stream, n):
        out = []
        for images, targets in stream:
            out.append((images, targets))
            if len(out) == n:
                return out

    straight = batches(loader(), 5)
    first = loader()
    batches(first, 2)
    resumed = loader()
    assert resumed.load_state_dict(first.state_dict())
    for (x, t), (u, v) in zip(straight[2:], batches(resumed, 3)):
        assert all(torch.equal(a, b) for a, b in zip(x, u))
        assert all(torch.equal(a["boxes"], b["boxes"]) and torch.equal(a["masks"], b["masks"]) for a, b in zip(t, v))
