"""`vit pretrain` end to end on small local data: run directory contents, checkpoints, resume."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from helpers import TINY, read_metrics, recipe_file, run_cli
from vitcli.data import LoaderSpec, make_loader
from vitcli.engine.setup import build_data
from vitcli.io import checkpoint as ckpt
from vitcli.models import create_model
from vitcli.objectives import evaluate
from vitcli.recipe import load_recipe










@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Two classes of 16x16 images: dark squares and bright squares, 24 each, split train/test."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 4)):
        for c, base in enumerate((40, 200)):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                px = np.clip(base + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def cifar100_copy(tmp_path_factory) -> Path:
    """A save_to_disk copy with CIFAR-100's hub schema: img, fine_label (100 names), coarse_label."""
    root = tmp_path_factory.mktemp("c100") / "cifar100"
    rng = np.random.default_rng(1)
    features = datasets.Features(
        {
            "img": datasets.Image(),
            "fine_label": datasets.ClassLabel(names=[f"class_{i}" for i in range(100)]),
            "coarse_label": datasets.ClassLabel(names=[f"super_{i}" for i in range(20)]),
        }
    )

    def split(n):
        labels = [int(i % 3) for i in range(n)]
        imgs = [Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
        return datasets.Dataset.from_dict({"img": imgs, "fine_label": labels, "coarse_label": [0] * n}, features=features)

    datasets.DatasetDict({"train": split(32), "test": split(12)}).save_to_disk(str(root))
    return root




def test_pretrain_on_an_image_folder_writes_a_complete_run(tmp_path, image_folder):
    run = tmp_path / "run"
    code = run_cli("pretrain", str(recipe_file(tmp_path)), "--out", str(run), "--set", f"data.dataset={image_folder}",
                   *sum((["--set", s] for s in TINY), []), "--set", "train.eval_every=3")
    assert code == 0
    # recipe.yaml is the resolved recipe: loading it gives what ran
    saved = (run / "recipe.yaml").read_text()
    assert "embed_dim: 32" in saved and str(image_folder) in saved
    events = read_metrics(run)
    train = [e for e in events if e["kind"] == "train"]
    evals = [e for e in events if e["kind"] == "eval"]
    assert [e["step"] for e in train] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "images_per_second", "epoch"} <= set(train[0])
    assert [e["step"] for e in evals] == [3, 6]
    assert all({"top1", "top5", "loss", "num_images"} <= set(e) for e in evals)
    assert evals[0]["num_images"] == 8
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_top1"] == evals[-1]["top1"]
    assert summary["best_top1"] == max(e["top1"] for e in evals)
    assert {"epochs", "wall_seconds", "checkpoint"} <= set(summary)
    # best and last checkpoints load into a freshly built model and reproduce the logged accuracy
    best = Path(summary["checkpoint"])
    assert best.exists() and (run / "checkpoints" / "last" / ckpt.STATE).exists()
    weights, meta = ckpt.read_weights(best)
    assert meta["class_names"] == ["class0", "class1"] and meta["mean"] == [0.5, 0.5, 0.5]
    data = build_data(load_recipe(run / "recipe.yaml"))  # the run's own eval split and transform
    for path, logged in ((best, summary["best_top1"]), (run / "checkpoints" / "last" / ckpt.WEIGHTS, summary["final_top1"])):
        weights, meta = ckpt.read_weights(path)
        model = create_model(meta["model"], **meta["model_args"])
        model.load_state_dict(weights)
        loader = make_loader(data.eval, data.eval_transform, LoaderSpec.evaluation(4))
        scores = evaluate(model, loader, data.num_classes, torch.device("cpu"))
        assert scores["top1"] == logged == meta["top1"] and scores["num_images"] == 8
    state = ckpt.read_state(run / "checkpoints" / "last" / ckpt.STATE)
    assert state["step"] == 6 and "optimizer" in state and "rng" in state


def test_pretrain_on_a_save_to_disk_copy_with_cifar100_schema(tmp_path, cifar100_copy):
    run = tmp_path / "run"
    code = run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 4}\n")), "--out", str(run), "--set", f"data.dataset={cifar100_copy}",
                   *sum((["--set", s] for s in TINY), []))
    assert code == 0
    weights, meta = ckpt.read_weights(run / "checkpoints" / "last" / ckpt.WEIGHTS)
    assert meta["num_classes"] == 100 and weights["head.weight"].shape == (100, 32)
    evals = [e for e in read_metrics(run) if e["kind"] == "eval"]
    assert evals[-1]["num_images"] == 12


def test_resume_gives_the_same_metrics_as_an_uninterrupted_run(tmp_path):
    """Train 8 steps; separately, drop the second half of a run and resume it: the metrics agree exactly."""
    args = [*sum((["--set", s] for s in TINY), []), "--set", "data.dataset=digits", "--set", "data.train_subset=64",
            "--set", "data.eval_subset=40", "--set", "train.eval_every=4", "--set", "model.img_size=8", "--set", "model.patch_size=2",
            "--set", "model.drop_path_rate=0.1", "--set", "model.drop_rate=0.1", "--set", "data.crop_scale=[0.6,1]", "--set", "train.keep=5"]
    recipe = recipe_file(tmp_path, "train: {steps: 12}\n")
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert run_cli("pretrain", str(recipe), "--out", str(full), *args) == 0
    assert run_cli("pretrain", str(recipe), "--out", str(cut), *args) == 0
    # make `cut` look like a run killed just after its step-4 checkpoint
    for c in ckpt.step_dirs(cut / "checkpoints"):
        if c.step > 4:
            shutil.rmtree(c.path)
    (cut / "summary.json").unlink()
    (cut / "checkpoints" / "last").unlink()
    assert run_cli("pretrain", str(recipe), "--out", str(cut), "--resume", *args) == 0

    def comparable(run):
        return [{k: v for k, v in e.items() if k not in ("time", "images_per_second", "wall_seconds", "path")} for e in read_metrics(run)]

    assert comparable(cut) == comparable(full)
    a, _ = ckpt.read_weights(full / "checkpoints" / "last" / ckpt.WEIGHTS)
    b, _ = ckpt.read_weights(cut / "checkpoints" / "last" / ckpt.WEIGHTS)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_same_seed_same_metrics_and_other_seed_differs(tmp_path):
    args = [*sum((["--set", s] for s in TINY), []), "--set", "data.dataset=digits", "--set", "data.train_subset=32",
            "--set", "data.eval_subset=16", "--set", "model.img_size=8", "--set", "model.patch_size=2"]
    recipe = recipe_file(tmp_path, "train: {steps: 3}\n")
    losses = []
    for out, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert run_cli("pretrain", str(recipe), "--out", str(tmp_path / out), "--set", f"train.seed={seed}", *args) == 0
        losses.append([e["loss"] for e in read_metrics(tmp_path / out) if e["kind"] == "train"])
    assert losses[0] == losses[1] and losses[0] != losses[2]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """batch 8 as 4 micro-batches of 2 gives the same weights as 1 batch of 8 (no dropout, fp32)."""
    args = [*sum((["--set", s] for s in TINY), []), "--set", "data.dataset=digits", "--set", "data.train_subset=32",
            "--set", "data.eval_subset=16", "--set", "model.img_size=8", "--set", "model.patch_size=2"]
    recipe = recipe_file(tmp_path, "train: {steps: 3}\n")
    assert run_cli("pretrain", str(recipe), "--out", str(tmp_path / "big"), *args) == 0
    assert run_cli("pretrain", str(recipe), "--out", str(tmp_path / "acc"), "--set", "train.micro_batch_size=2", *args) == 0
    a, _ = ckpt.read_weights(tmp_path / "big" / "checkpoints" / "last" / ckpt.WEIGHTS)
    b, _ = ckpt.read_weights(tmp_path / "acc" / "checkpoints" / "last" / ckpt.WEIGHTS)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)


def test_out_dir_holding_another_run_is_refused_without_flags(tmp_path, capsys):
    args = [*sum((["--set", s] for s in TINY), []), "--set", "data.dataset=digits", "--set", "data.train_subset=16",
            "--set", "data.eval_subset=8", "--set", "model.img_size=8", "--set", "model.patch_size=2"]
    recipe = recipe_file(tmp_path, "train: {steps: 2}\n")
    run = tmp_path / "run"
    assert run_cli("pretrain", str(recipe), "--out", str(run), *args) == 0
    before = (run / "metrics.jsonl").read_text()
    assert run_cli("pretrain", str(recipe), "--out", str(run), *args, "--set", "optim.lr=0.5") == 2
    err = capsys.readouterr().err
    assert "already holds a different run" in err and "--resume" in err and "Traceback" not in err
    assert (run / "metrics.jsonl").read_text() == before
    assert run_cli("pretrain", str(recipe), "--out", str(run), *args, "--set", "optim.lr=0.5", "--force") == 0


@pytest.mark.slow
def test_console_script_reports_a_bad_recipe_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: -1}\ntrain: {epochs: 1}\n")
    vit = Path(sys.executable).with_name("vit")
    proc = subprocess.run([str(vit), "pretrain", str(bad), "--out", str(tmp_path / "r")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "'optim.lr' must be a positive number" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.name=vit_b61", "Did you mean: vit_b16"),
        ("model.img_size=9", "not a multiple of the patch size"),
        ("data.dataset=cifra100", "Did you mean: cifar100"),
        ("data.dataset=/no/such/folder", "no such file or folder"),
        ("model.init_ckpt=/no/such.safetensors", "does not exist"),
    ],
)
def test_bad_model_or_data_is_refused_before_anything_is_written(tmp_path, capsys, override, message):
    run = tmp_path / "run"
    args = [*sum((["--set", s] for s in TINY), []), "--set", "data.dataset=digits", "--set", "model.img_size=8", "--set", "model.patch_size=2"]
    assert run_cli("pretrain", str(recipe_file(tmp_path)), "--out", str(run), *args, "--set", override) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not run.exists()


def test_a_data_set_that_fails_to_load_leaves_nothing_behind(tmp_path, capsys):
    """cifar100 cannot be reached offline: one clear message, and no run directory is created."""
    run = tmp_path / "run"
    args = [*sum((["--set", s] for s in TINY), []), "--set", "data.dataset=cifar100"]
    assert run_cli("pretrain", str(recipe_file(tmp_path)), "--out", str(run), *args) == 2
    err = capsys.readouterr().err
    assert "cifar100" in err and "--data-dir" in err and "Traceback" not in err
    assert not run.exists()


@pytest.fixture
def folder_with_a_corrupt_image(image_folder, tmp_path) -> Path:
    root = tmp_path / "folder"
    shutil.copytree(image_folder, root)
    (root / "train" / "class0" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return root


def test_corrupt_images_are_skipped_and_counted_when_asked(tmp_path, folder_with_a_corrupt_image):
    run = tmp_path / "run"
    args = [*sum((["--set", s] for s in TINY), []), "--set", f"data.dataset={folder_with_a_corrupt_image}", "--set", "data.bad_images=skip"]
    assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {epochs: 2}\n")), "--out", str(run), *args) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["skipped_images"] == 2  # the broken file, met once in each of the 2 epochs
    assert any(e.get("skipped_images") for e in read_metrics(run) if e["kind"] == "train")


def test_corrupt_image_is_a_clear_error_by_default(tmp_path, folder_with_a_corrupt_image, capsys):
    run = tmp_path / "run"
    args = [*sum((["--set", s] for s in TINY), []), "--set", f"data.dataset={folder_with_a_corrupt_image}"]
    assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {epochs: 2}\n")), "--out", str(run), *args) == 2
    err = capsys.readouterr().err
    assert "broken.png" in err and "bad_images" in err and "Traceback" not in err
