"""`vit eval`'s library side: run_eval on checkpoints made here, against direct computations."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from rich.console import Console

from vitcli import data as vdata
from vitcli.io import checkpoint as ckpt
from vitcli.data import LoaderSpec
from vitcli.engine.evalrun import EvalSpec, FewshotSpec, run_eval
from vitcli.engine.report import confusion_matrix, print_eval, worst_classes
from vitcli.errors import VitError
from vitcli.models import create_model
from vitcli.io.meta import CheckpointMeta
from vitcli.models.adapt import meta_for_model

from helpers import make_ckpt, offline_env, run_cli

KEYS = ("top1", "top5", "loss", "ece", "num_images", "images_per_second", "per_class_accuracy", "checkpoint",
        "dataset", "split", "img_size")



def eval_spec(ckpt, dataset, *, batch_size: int = 256, num_workers: int = 2, fewshot=(), res=None, **settings) -> EvalSpec:
    """run_eval's spec, with the command line's shapes (an int resolution, a list of shots)."""
    return EvalSpec(ckpt, dataset, res=(res, res) if isinstance(res, int) else res, fewshot=FewshotSpec(tuple(fewshot)),
                    loader=LoaderSpec.evaluation(batch_size, num_workers=num_workers), **settings)



def direct_logits(ckpt_path: Path, img_size=(8, 8)) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the model by hand on the digits test split, transformed with the default eval transform."""
    from vitcli.models.adapt import model_from_checkpoint

    model, _ = model_from_checkpoint(ckpt_path, img_size=img_size if img_size != (8, 8) else None)
    split = vdata.load_split("digits", role="eval")
    tf = vdata.build_transform(vdata.TransformSpec(), img_size, train=False)
    images = torch.stack([tf(img) for img in split.dataset["image"]])
    labels = torch.tensor(split.dataset["label"])
    with torch.no_grad():
        return model.eval()(images), labels


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One evaluation of a 10-class vit_pico on digits, with predictions, confusion and few-shot."""
    tmp = tmp_path_factory.mktemp("eval")
    path = make_ckpt(tmp / "pico.safetensors")
    said: list[str] = []
    with offline_env() as mp:  # module-scoped: conftest's per-test offline env is not active
        mp.setenv("HF_DATASETS_CACHE", str(tmp / "hf-cache"))
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", tmp / "hf-cache")
        spec = eval_spec(str(path), None, num_workers=0, batch_size=100, predictions=tmp / "out" / "pred.csv",
                         confusion=tmp / "out" / "confusion.png", fewshot=[1, 10])
        result = run_eval(spec, say=said.append)
    return path, result, said


def test_metrics_agree_with_a_direct_computation(digits_run):
    path, r, _ = digits_run
    logits, labels = direct_logits(path)
    top5 = logits.topk(5, dim=1).indices
    assert r["dataset"] == "digits" and r["split"] == "test" and r["img_size"] == [8, 8]
    assert r["num_images"] == len(labels) == 360
    assert r["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert r["top5"] == pytest.approx((top5 == labels[:, None]).any(1).float().mean().item())
    assert r["loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-5)
    assert 0 <= r["ece"] <= 1 and r["images_per_second"] > 0
    per_class = [(logits.argmax(1)[labels == c] == c).float().mean().item() for c in range(10)]
    assert r["per_class_accuracy"] == pytest.approx(per_class)


def test_result_is_json_with_the_documented_keys(digits_run):
    _, r, _ = digits_run
    for key in KEYS:
        assert key in r, key
    again = json.loads(json.dumps(r, allow_nan=False))
    assert again == r
    for key in ("top1", "top5"):
        assert 0.0 <= again[key] <= 1.0
    assert set(again["fewshot"]) == {"1", "10"} and again["fewshot_l2"] == 1024.0


def test_predictions_csv_has_one_row_per_image_matching_the_argmax(digits_run):
    path, r, _ = digits_run
    logits, labels = direct_logits(path)
    with open(r["predictions"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == r["num_images"]
    assert [int(row["prediction"]) for row in rows] == logits.argmax(1).tolist()
    assert [int(row["label"]) for row in rows] == labels.tolist()
    assert [int(row["index"]) for row in rows] == list(range(len(rows)))
    probs = logits.softmax(1)
    assert float(rows[0]["confidence"]) == pytest.approx(probs[0].max().item(), abs=1e-5)
    assert [int(c) for c in rows[0]["top5"].split()] == probs[0].topk(5).indices.tolist()
    assert rows[0]["label_name"] == str(labels[0].item())


def test_confusion_png_opens(digits_run):
    _, r, _ = digits_run
    with Image.open(r["confusion"]) as img:
        assert img.format == "PNG" and img.size[0] > 100


def test_fewshot_on_digits_is_well_above_chance(digits_run):
    _, r, _ = digits_run
    # Random-init vit_pico features; chance is 10%. 10-shot linear probes get ~35% here.
    assert r["fewshot"]["10"] > 0.2
    assert r["fewshot"]["10"] >= r["fewshot"]["1"] - 0.05


def test_print_eval_table(digits_run):
    _, r, _ = digits_run
    console = Console(record=True, width=120)
    print_eval(r, console)
    text = console.export_text()
    for word in ("top-1", "top-5", "ECE", "images/s", "digits [test]", "worst 5 classes", "10-shot linear"):
        assert word in text, word


def test_worst_classes_by_name_skip_absent_ones():
    assert worst_classes([0.5, None, 0.1, 0.9], ["cat", "dog", "eel", "fox"], n=2) == [("eel", 0.1), ("cat", 0.5)]
    assert worst_classes([0.5, 0.2], None, n=1) == [("class 1", 0.2)]


def test_confusion_matrix_counts_and_grouping():
    counts, group = confusion_matrix(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 0]), 3)
    assert group == 1 and counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    counts, group = confusion_matrix(np.array([0, 5, 9]), np.array([1, 5, 0]), 10, max_cells=5)
    assert group == 2 and counts.shape == (5, 5) and counts.sum() == 3 and counts[0, 0] == 1 and counts[4, 0] == 1


def test_res_different_from_the_checkpoint_interpolates(tmp_path):
    path = make_ckpt(tmp_path / "p.safetensors")
    said: list[str] = []
    seen: list[tuple[int, int]] = []
    r = run_eval(eval_spec(path, "digits", res=16, num_workers=0, subset=50, batch_size=32), say=said.append,
                 progress=lambda done, total: seen.append((done, total)))
    assert r["img_size"] == [16, 16] and r["num_images"] == 50 and seen == [(32, 50), (50, 50)]
    assert any("position embeddings resampled" in s for s in said)
    logits, labels = direct_logits(path, img_size=(16, 16))
    keep = np.sort(np.random.default_rng(0).permutation(360)[:50])
    assert r["top1"] == pytest.approx((logits[keep].argmax(1) == labels[keep]).float().mean().item())


def test_no_ckpt_takes_the_newest_runs_best_checkpoint(tmp_path):
    root = tmp_path / "runs"
    for i, name in enumerate(("old", "new")):
        run = root / name
        (run / "checkpoints").mkdir(parents=True)
        (run / "recipe.yaml").write_text("name: x\n")
        torch.manual_seed(i)
        model = create_model("vit_pico", num_classes=10)
        ckpt.save_checkpoint(run / "checkpoints", 10, model.state_dict(), meta_for_model(model, {"dataset": "digits"}).to_dict(),
                             {"step": 10}, is_best=True, keep=1)
        time.sleep(0.02)
    import os

    os.utime(root / "new" / "recipe.yaml")
    said: list[str] = []
    r = run_eval(eval_spec(None, None, runs_root=root, num_workers=0, subset=20), say=said.append)
    assert "new" in r["checkpoint"] and r["checkpoint"].endswith("model.safetensors")
    assert any("new" in s and "--ckpt" in s for s in said)


def test_no_ckpt_and_no_run_says_to_pass_ckpt(tmp_path):
    with pytest.raises(VitError, match="--ckpt"):
        run_eval(eval_spec(None, "digits", runs_root=tmp_path / "runs"))


def test_checkpoint_without_dataset_needs_dataset(tmp_path):
    path = make_ckpt(tmp_path / "p.safetensors", dataset=None)
    with pytest.raises(VitError, match="--dataset"):
        run_eval(eval_spec(path, None, num_workers=0))


def test_class_count_mismatch_is_a_clear_error_unless_fewshot(tmp_path):
    path = make_ckpt(tmp_path / "p.safetensors", num_classes=7)
    with pytest.raises(VitError, match=r"7 classes.*vit finetune.*--fewshot"):
        run_eval(eval_spec(path, "digits", num_workers=0))
    r = run_eval(eval_spec(path, "digits", num_workers=0, subset=100, fewshot=[5]))
    assert r["top1"] is None and r["num_images"] == 100 and 0.0 <= r["fewshot"]["5"] <= 1.0
    json.dumps(r, allow_nan=False)


def test_offline_named_set_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = make_ckpt(tmp_path / "p.safetensors", num_classes=100, dataset="cifar100")
    start = time.perf_counter()
    with pytest.raises(VitError) as e:
        run_eval(eval_spec(path, "cifar100", num_workers=0))
    assert time.perf_counter() - start < 15
    msg = str(e.value)
    assert "cifar100" in msg and "offline" in msg and "--data-dir" in msg and "save_to_disk" in msg


def _png(rng) -> dict:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def test_cifar100_local_copy_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"class_{i:02d}" for i in range(100)]
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=names),
                                  "coarse_label": datasets.ClassLabel(num_classes=20)})

    def split(n):
        return datasets.Dataset.from_dict({"img": [_png(rng) for _ in range(n)], "fine_label": [i % 100 for i in range(n)],
                                           "coarse_label": [i % 20 for i in range(n)]}, features=features)

    copy = tmp_path / "cifar100-copy"
    datasets.DatasetDict({"train": split(200), "test": split(120)}).save_to_disk(str(copy))
    path = make_ckpt(tmp_path / "c100.safetensors", num_classes=100, dataset="cifar100")
    r = run_eval(eval_spec(path, "cifar100", data_dir=str(copy), num_workers=0, batch_size=64, fewshot=[1],
                           confusion=tmp_path / "c.png"))
    assert r["dataset"] == "cifar100" and r["split"] == "test" and r["num_images"] == 120
    assert r["class_names"][:2] == ["class_00", "class_01"] and len(r["per_class_accuracy"]) == 100
    assert 0.0 <= r["top1"] <= r["top5"] <= 1.0 and "1" in r["fewshot"]
    with Image.open(r["confusion"]) as img:
        assert img.format == "PNG"


def test_eval_res_takes_height_x_width_like_finetune_and_bench(tmp_path, capsys):
    path = make_ckpt(tmp_path / "p.safetensors")
    assert run_cli("eval", "--ckpt", str(path), "--dataset", "digits", "--res", "16x8", "--num-workers", "0", "--json") == 0
    r = json.loads(capsys.readouterr().out)
    logits, labels = direct_logits(path, img_size=(16, 8))
    assert r["img_size"] == [16, 8] and r["top1"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert run_cli("eval", "--ckpt", str(path), "--dataset", "digits", "--res", "16y8") == 2
    assert "HEIGHTxWIDTH" in capsys.readouterr().err


def test_eval_transform_follows_the_checkpoint_meta():
    meta = CheckpointMeta.from_dict({"model": "vit_pico", "model_args": {}, "mean": [0.1, 0.2, 0.3], "std": [1, 2, 3],
                                     "interpolation": "bilinear", "crop_pct": 1.0})
    cfg = vdata.TransformSpec.from_checkpoint(meta)
    assert (cfg.mean, cfg.std, cfg.interpolation, cfg.crop_pct) == ((0.1, 0.2, 0.3), (1.0, 2.0, 3.0), "bilinear", 1.0)
    cfg = vdata.TransformSpec.from_checkpoint(CheckpointMeta.from_dict({"model": "vit_pico", "model_args": {}}))
    assert (cfg.mean, cfg.std, cfg.interpolation, cfg.crop_pct) == ((0.5,) * 3, (0.5,) * 3, "bicubic", 0.875)
