"""Multi-label classification: labels files and Sequence(ClassLabel) sets, multi-hot batches, BCE, mAP, F1,
and the threshold through eval, predict and export."""

from __future__ import annotations

import json
import random

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.metrics import average_precision_score, f1_score

from helpers import make_ckpt, recipe_file, run_cli
from vitcli import data as vdata
from vitcli.errors import VitError
from vitcli.objectives.multilabel import average_precision, best_threshold, f1_at, ranking_metrics

SETTINGS = ["model.name=vit_pico", "model.img_size=[8,16]", "model.patch_size=4", "model.embed_dim=32", "model.depth=2",
            "model.num_heads=2", "data.num_workers=0", "data.hflip=0.0", "schedule.warmup_steps=2", "train.batch_size=16",
            "train.log_every=1", "train.eval_every=4"]


def pairs_folder(root, n=80, fmt="csv"):
    """Images of two side-by-side digits, labelled with both digits: a multi-label set with its labels file."""
    digits = load_digits()
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    rows = {}
    for i in range(n):
        a, b = rng.integers(0, len(digits.images), 2)
        pixels = np.concatenate([digits.images[a], digits.images[b]], axis=1) * 15
        Image.fromarray(pixels.astype(np.uint8)).save(root / "img" / f"{i}.png")
        rows[f"img/{i}.png"] = sorted({str(digits.target[a]), str(digits.target[b])})
    if fmt == "csv":
        text = "path,labels\n" + "".join(f"{p},{';'.join(labels)}\n" for p, labels in rows.items())
        (root / "labels.csv").write_text(text)
    else:
        (root / "labels.json").write_text(json.dumps([{"path": p, "labels": labels} for p, labels in rows.items()]))
    return root, root / f"labels.{fmt}", rows


def test_average_precision_and_f1_are_sklearns():
    rng = np.random.default_rng(0)
    targets = (rng.random((60, 5)) < 0.3).astype(np.float32)
    targets[:, 4] = 0  # a class without a positive image has no AP
    scores = np.round(rng.random((60, 5)) * 0.6 + 0.4 * targets, 1)  # rounded: many ties
    ap = average_precision(scores, targets)
    for c in range(4):
        assert ap[c] == pytest.approx(average_precision_score(targets[:, c], scores[:, c]), abs=1e-12)
    assert np.isnan(ap[4])
    assert ranking_metrics(scores, targets)["map"] == pytest.approx(np.mean(ap[:4]))
    assert f1_at(scores, targets, 0.5) == pytest.approx(f1_score(targets.ravel(), scores.ravel() >= 0.5))
    # F1 is scored on each half with the threshold the other half chose, then averaged
    even, odd = np.arange(60) % 2 == 0, np.arange(60) % 2 == 1
    by_hand = np.mean([f1_at(scores[odd], targets[odd], best_threshold(scores[even], targets[even])),
                       f1_at(scores[even], targets[even], best_threshold(scores[odd], targets[odd]))])
    result = ranking_metrics(scores, targets)
    assert result["f1"] == pytest.approx(by_hand) and result["threshold"] == best_threshold(scores, targets)


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_a_folder_with_a_labels_file_gives_multi_hot_batches(fmt, tmp_path):
    root, labels, rows = pairs_folder(tmp_path / "pairs", n=20, fmt=fmt)
    spec = vdata.SourceSpec(dataset=str(root), labels=str(labels), train_split="train", eval_split="train")
    train = vdata.build(spec, "train")
    assert train.multilabel and train.class_names == sorted({c for v in rows.values() for c in v})
    tf = vdata.build_transform(vdata.TransformSpec(pipeline="pil", crop_pct=1.0), (8, 16), train=False)
    images, targets = next(iter(vdata.make_loader(train, tf, vdata.LoaderSpec.evaluation(20))))
    assert targets.dtype == torch.float32 and targets.shape == (20, len(train.class_names))
    expected = [[float(name in rows[f"img/{i}.png"]) for name in train.class_names] for i in range(20)]
    assert targets.tolist() == expected


def test_labels_file_mistakes_are_one_clear_error(tmp_path):
    root, labels, _ = pairs_folder(tmp_path / "pairs", n=4)
    (root / "bad.csv").write_text("img/0.png,1;2,extra\n")
    (root / "missing.csv").write_text("img/99.png,1\n")
    for file, message in (("bad.csv", "line 1: expected 2 fields"), ("missing.csv", r"names 1 image\(s\) that are not in")):
        with pytest.raises(VitError, match=message):
            vdata.build(vdata.SourceSpec(dataset=str(root), labels=str(root / file)), "train")


def test_a_saved_set_with_a_sequence_of_class_labels_is_multi_label(tmp_path):
    pixel = Image.new("RGB", (8, 8))
    features = datasets.Features({"image": datasets.Image(),
                                  "labels": datasets.Sequence(datasets.ClassLabel(names=["cat", "dog", "sky"]))})
    ds = datasets.Dataset.from_dict({"image": [pixel] * 6, "labels": [[0], [1, 2], [], [0, 2], [1], [2]]}, features=features)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "saved"))
    train = vdata.build(vdata.SourceSpec(dataset=str(tmp_path / "saved")), "train")
    assert train.multilabel and train.class_names == ["cat", "dog", "sky"]
    tf = vdata.build_transform(vdata.TransformSpec(pipeline="pil"), (8, 8), train=False)
    _, targets = next(iter(vdata.make_loader(train, tf, vdata.LoaderSpec.evaluation(6))))
    assert targets.tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0], [1, 0, 1], [0, 1, 0], [0, 0, 1]]


def test_mixup_mixes_multi_hot_targets_as_the_images_and_bce_scores_them():
    mixup = vdata.build_mixup(vdata.MixSpec(mixup=0.8), num_classes=4)
    loss = vdata.build_train_loss(vdata.MixSpec(mixup=0.8), multilabel=True)
    x = torch.randn(4, 3, 8, 8)
    t = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.float32)
    np.random.seed(0)
    random.seed(0)
    mixed_x, mixed_t = mixup(x.clone(), t)
    lam = float(((mixed_x - x.flip(0)) / (x - x.flip(0))).flatten()[0])  # the images' own mixing weight
    torch.testing.assert_close(mixed_t, lam * t + (1 - lam) * t.flip(0))
    logits = torch.randn(4, 4)
    p = torch.sigmoid(logits)
    by_hand = -(mixed_t * p.log() + (1 - mixed_t) * (1 - p).log()).mean()
    torch.testing.assert_close(loss(logits, mixed_t), by_hand)


@pytest.fixture(scope="module")
def multilabel_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ml")
    root, labels, _ = pairs_folder(tmp / "pairs", n=120)
    run = tmp / "run"
    sets = [x for s in [*SETTINGS, f"data.dataset={root}", f"data.labels={labels}"] for x in ("--set", s)]
    assert run_cli("pretrain", str(recipe_file(tmp, "train: {steps: 8}\n")), "--out", str(run), *sets) == 0
    return run, root, labels


def test_training_on_multi_label_data_reports_map_and_keeps_its_threshold(multilabel_run, capsys):
    run, root, labels = multilabel_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["objective"] == "multilabel" and summary["best_metric"] == "map" and summary["best_score"] > 0
    from vitcli.models.load import load_checkpoint

    ck = load_checkpoint(str(run))
    assert ck.meta.task == "multilabel" and 0 < ck.meta.training["threshold"] < 1
    # vit eval on the split training held out gives back the run's best mAP
    capsys.readouterr()
    assert run_cli("eval", "--ckpt", str(run), "--split", "train[10%]", "--json", "--num-workers", "0") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["map"] == pytest.approx(summary["best_score"], abs=1e-9)
    assert {"map", "per_class_ap", "f1", "threshold"} <= set(result) and result["threshold"] == ck.meta.training["threshold"]


def test_predict_lists_the_labels_over_the_threshold(multilabel_run, capsys):
    run, root, _ = multilabel_run
    from vitcli.models.load import load_checkpoint, load_model

    threshold = load_checkpoint(str(run)).meta.training["threshold"]
    capsys.readouterr()
    assert run_cli("predict", "--ckpt", str(run), str(root / "img" / "0.png"), "--json", "--topk", "10") == 0
    (row,) = json.loads(capsys.readouterr().out)
    model = load_model(str(run))
    tf = vdata.build_transform(vdata.TransformSpec(crop_pct=0.875), (8, 16), train=False)
    with Image.open(root / "img" / "0.png") as img:
        with torch.no_grad():
            probs = torch.sigmoid(model(tf(img.convert("RGB"))[None]))[0]
    expected = {i for i, p in enumerate(probs.tolist()) if p >= threshold}
    assert {t["index"] for t in row["top"]} == expected
    assert all(t["probability"] == pytest.approx(float(probs[t["index"]]), abs=1e-5) for t in row["top"])


def test_export_keeps_the_sigmoid_head(multilabel_run, tmp_path):
    import onnx

    run, _, _ = multilabel_run
    assert run_cli("export", "--ckpt", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")) == 0
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert props["task"] == "multilabel" and props["activation"] == "sigmoid" and 0 < float(props["threshold"]) < 1
    assert run_cli("export", "--ckpt", str(run), "--format", "timm", "--out", str(tmp_path / "timm")) == 0
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["head"]["activation"] == "sigmoid"
    # transformers' own multi-label flag (a square model: transformers' ViT takes square inputs only)
    square = make_ckpt(tmp_path / "square.safetensors", task="multilabel", threshold=0.3)
    assert run_cli("export", "--ckpt", str(square), "--format", "hf", "--out", str(tmp_path / "hf")) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["problem_type"] == "multi_label_classification" and config["threshold"] == 0.3


@pytest.mark.parametrize("setting, message", [
    ("data.task=single", "data.task single, but"),
    ("data.balance=sampler", "data.balance counts one class per image"),
    ("data.imbalance=5", "data.imbalance counts one class per image"),
    ("data.holdout=0.2", "data.holdout counts one class per image"),
])
def test_multi_label_mistakes_are_one_clear_error(setting, message, tmp_path, capsys):
    root, labels, _ = pairs_folder(tmp_path / "pairs", n=20)
    sets = [x for s in [*SETTINGS, f"data.dataset={root}", f"data.labels={labels}", setting] for x in ("--set", s)]
    assert run_cli("pretrain", str(recipe_file(tmp_path)), "--out", str(tmp_path / "r"), *sets) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_task_multilabel_on_single_label_data_is_refused(tmp_path, capsys):
    assert run_cli("pretrain", str(recipe_file(tmp_path)), "--out", str(tmp_path / "r"),
                   *[x for s in ["model.name=vit_pico", "data.num_workers=0", "data.task=multilabel"] for x in ("--set", s)]) == 2
    assert "data.task multilabel, but digits has one class per image" in capsys.readouterr().err


def test_multi_label_shards_stream_multi_hot_targets_and_train(tmp_path, capsys):
    root, labels, rows = pairs_folder(tmp_path / "pairs", n=60)
    shards = tmp_path / "shards"
    assert run_cli("shards", str(root), str(shards), "--labels", str(labels), "--samples-per-shard", "20") == 0
    index = json.loads((shards / "index.json").read_text())
    assert index["multilabel"] is True and index["classes"] == sorted({c for v in rows.values() for c in v})
    from vitcli.data.shard_sets import stream_split
    from vitcli.data.tarshards import read_samples

    first = next(read_samples(str(shards / index["splits"]["train"]["shards"][0]["name"])))
    assert isinstance(first.label, list) and all(isinstance(c, int) for c in first.label)
    train = stream_split(str(shards), None)
    assert train.multilabel
    spec = vdata.LoaderSpec.training(8, seed=0)
    tf = vdata.build_transform(vdata.TransformSpec(pipeline="pil"), (8, 16), train=True)
    _, targets = next(iter(vdata.make_stream_loader(train, tf, spec, buffer=4)))
    assert targets.dtype == torch.float32 and targets.shape == (8, len(index["classes"])) and targets.sum(1).min() >= 1
    # the evaluation split is read whole as a Sequence(ClassLabel) table; training streams and reports mAP
    sets = [x for s in [*SETTINGS, f"data.dataset={shards}", "data.shuffle_buffer=8"] for x in ("--set", s)]
    assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 4}\n")), "--out", str(tmp_path / "run"), *sets) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["best_metric"] == "map"
