"""A newcomer's path: fine-tuning defaults that fit the data, a folder scored whole by `vit eval`, one
clear message for every unwritable destination, vitcli's own line instead of `datasets`' bars."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

import vitcli.io.paths as paths
from vitcli.data import TransformSpec, build_transform
from vitcli.engine.finetune import MAX_EPOCHS, MIN_BATCH, MIN_BATCHES_PER_EPOCH, fitted_schedule
from vitcli.models.adapt import model_from_checkpoint
from vitcli.recipe import load_recipe

from helpers import REPO, TINY, offline_env, recipe_file, run_cli

SETS = [x for s in TINY for x in ("--set", s)]
DIGITS = [*SETS, "--set", "data.dataset=digits", "--set", "data.train_subset=64", "--set", "data.eval_subset=20",
          "--set", "model.img_size=8", "--set", "model.patch_size=2"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pre")
    with offline_env():  # module-scoped: conftest's per-test offline env is not active
        assert run_cli("pretrain", str(recipe_file(tmp, "train: {steps: 2}\n")), "--out", str(tmp / "run"), *DIGITS) == 0
    return tmp / "run"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A folder of class folders and nothing else (no train/ or test/): 3 classes x 12 images of 8x8."""
    root = tmp_path_factory.mktemp("classes") / "shapes"
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(12):
            px = np.clip(60 * c + rng.normal(40, 25, (8, 8)), 0, 255).astype(np.uint8)
            Image.fromarray(px).save(root / f"c{c}" / f"{i}.png")
    return root


class OsWith:
    """The os module as vitcli.io.paths sees it, with some functions replaced (the rest of the process keeps os)."""

    def __init__(self, **replaced):
        self.__dict__.update(replaced)

    def __getattr__(self, name):
        return getattr(os, name)


def file_in_the_way(tmp_path: Path) -> Path:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file where a folder would have to be\n")
    return blocker


# ---- 1. fine-tuning defaults that fit the data set --------------------------------------------------


def test_finetune_without_a_recipe_takes_the_sets_shipped_recipe(pretrained, tmp_path, capsys):
    out = tmp_path / "ft"
    assert run_cli("finetune", "--ckpt", str(pretrained), "--out", str(out), "--set", "train.steps=2",
                   "--set", "data.train_subset=300", "--set", "data.eval_subset=20") == 0
    assert "Fine-tuning with the shipped recipe 'finetune_digits' for digits" in capsys.readouterr().out
    used, shipped = load_recipe(out / "recipe.yaml"), load_recipe(REPO / "recipes" / "finetune_digits.yaml")
    assert (used.train.batch_size, used.optim.lr, used.schedule.warmup_steps, used.data.crop_scale) == \
        (shipped.train.batch_size, shipped.optim.lr, shipped.schedule.warmup_steps, shipped.data.crop_scale)


# (training images, batch, steps), worked by hand: batch 512 halved until 10 batches fit (not below 16,
# not above the set), steps the paper's 2,500 capped at 50 epochs of n // batch steps.
FITTED = [(1, 1, 50), (10, 10, 50), (36, 16, 100), (150, 16, 450), (1_437, 128, 550), (5_000, 256, 950),
          (5_120, 512, 500), (50_000, 512, 2_500), (1_281_167, 512, 2_500)]


@pytest.mark.parametrize("n, batch, steps", FITTED)
def test_fitted_schedule_keeps_the_paper_where_the_set_is_big_enough(n, batch, steps):
    fit = fitted_schedule(n, "my-folder")["train"]
    assert (fit["batch_size"], fit["steps"], fit["micro_batch_size"]) == (batch, steps, min(64, batch))
    assert steps <= MAX_EPOCHS * (n // batch) and (batch == min(n, MIN_BATCH) or n >= MIN_BATCHES_PER_EPOCH * batch)
    assert fitted_schedule(1_281_167, "imagenet-1k")["train"]["steps"] == 20_000  # the paper's, 8 epochs


def test_finetune_on_a_set_without_recipe_states_its_fitted_plan_and_time(pretrained, folder, tmp_path, capsys):
    out = tmp_path / "ft"
    assert run_cli("finetune", "--ckpt", str(pretrained), "--dataset", str(folder), "--out", str(out),
                   "--set", "data.num_workers=0", "--set", "train.log_every=10") == 0
    text = capsys.readouterr().out
    recipe = load_recipe(out / "recipe.yaml")
    # 36 images, 32 carved for training: batch 16 (not 512), 2 steps an epoch, 50 epochs = 100 steps
    assert (recipe.train.batch_size, recipe.train.steps) == (16, 100)
    assert "fitted to 32 training images" in text and "100 steps (50 epochs) of 16 images" in text
    step_lines = [line for line in text.splitlines() if line.startswith("step ")]
    assert step_lines and all("eta " in line and "total ~" in line for line in step_lines)
    assert json.loads((out / "summary.json").read_text())["steps"] == 100


# ---- 2. a folder handed to `vit eval` is scored whole ------------------------------------------------


def test_eval_scores_every_image_of_a_folder(folder, tmp_path, capsys):
    from helpers import make_ckpt

    path = make_ckpt(tmp_path / "m.safetensors", num_classes=3, dataset=None)
    assert run_cli("eval", "--ckpt", str(path), "--dataset", str(folder), "--num-workers", "0", "--json",
                   "--predictions", str(tmp_path / "p.csv")) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["num_images"] == 36 and r["split"] == "train" and r["skipped_images"] == 0
    # the same top-1 as the model run by hand over every file
    model, _ = model_from_checkpoint(path)
    tf = build_transform(TransformSpec(), (8, 8), train=False)
    files = sorted(folder.glob("*/*.png"))
    images = torch.stack([tf(Image.open(f)) for f in files])
    labels = torch.tensor([int(f.parent.name[1]) for f in files])
    with torch.no_grad():
        assert r["top1"] == pytest.approx((model(images).argmax(1) == labels).float().mean().item())
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 37
    # the part training holds out is still there by name
    assert run_cli("eval", "--ckpt", str(path), "--dataset", str(folder), "--split", "train[10%]", "--json") == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 4


def test_eval_names_an_unreadable_image_anywhere_or_skips_and_counts_it(folder, tmp_path, capsys):
    from helpers import make_ckpt

    broken = tmp_path / "shapes"
    shutil.copytree(folder, broken)
    (broken / "c2" / "zz-broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    path = make_ckpt(tmp_path / "m.safetensors", num_classes=3, dataset=None)
    assert run_cli("eval", "--ckpt", str(path), "--dataset", str(broken), "--num-workers", "0") == 2
    err = capsys.readouterr().err
    assert "zz-broken.png" in err and "--bad-images skip" in err and "Traceback" not in err
    assert run_cli("eval", "--ckpt", str(path), "--dataset", str(broken), "--num-workers", "0", "--json",
                   "--bad-images", "skip") == 0
    r = json.loads(capsys.readouterr().out)
    assert (r["num_images"], r["skipped_images"]) == (36, 1)


# ---- 3. unwritable destinations: one message, exit 2, nothing half-written ---------------------------


def writing_commands(pretrained: Path, folder: Path, sharded: Path, blocked: Path) -> dict[str, list[str]]:
    recipe = str(REPO / "recipes" / "quickstart.yaml")
    return {
        "pretrain": ["pretrain", recipe, "--out", str(blocked / "run"), *DIGITS],
        "finetune": ["finetune", "--ckpt", str(pretrained), "--out", str(blocked / "run"), "--set", "train.steps=1"],
        "eval --predictions": ["eval", "--ckpt", str(pretrained), "--predictions", str(blocked / "p.csv")],
        "eval --confusion": ["eval", "--ckpt", str(pretrained), "--confusion", str(blocked / "c.png")],
        "interpolate-pos": ["interpolate-pos", "--ckpt", str(pretrained), "--res", "16", "--out", str(blocked / "x.safetensors")],
        "inspect": ["inspect", "--ckpt", str(pretrained), "--out", str(blocked / "figures")],
        "plot": ["plot", str(pretrained), "--out", str(blocked / "curves.png")],
        "consolidate": ["consolidate", str(sharded), "--out", str(blocked / "w.safetensors")],
    }


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("fsdp")
    with offline_env():
        assert run_cli("pretrain", str(recipe_file(tmp, "train: {steps: 1}\n")), "--out", str(tmp / "run"), *DIGITS,
                       "--set", "train.strategy=fsdp") == 0
    return tmp / "run" / "checkpoints" / "step-00000001"


COMMANDS = ["pretrain", "finetune", "eval --predictions", "eval --confusion", "interpolate-pos", "inspect", "plot", "consolidate"]


@pytest.mark.parametrize("command", COMMANDS)
def test_a_file_in_the_way_of_the_destination_is_one_clear_error(command, pretrained, folder, sharded, tmp_path, capsys):
    blocker = file_in_the_way(tmp_path)
    args = writing_commands(pretrained, folder, sharded, blocker)[command]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert str(blocker) in err and "is a file" in err and "Traceback" not in err and err.count("error:") == 1
    assert blocker.read_text().startswith("a file where")  # untouched


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("code, says", [(errno.EACCES, "permission denied"), (errno.EROFS, "read-only")])
def test_an_unwritable_folder_is_refused_before_any_work(command, code, says, pretrained, folder, sharded, tmp_path,
                                                         capsys, monkeypatch):
    target = tmp_path / "locked"
    target.mkdir()
    monkeypatch.setattr(paths, "os", OsWith(access=lambda p, mode: not Path(p).resolve().is_relative_to(target.resolve())))
    monkeypatch.setattr(paths, "_read_only", lambda folder: code == errno.EROFS)
    args = writing_commands(pretrained, folder, sharded, target)[command]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert says in err and str(target) in err and "Traceback" not in err
    assert list(target.iterdir()) == []


@pytest.mark.parametrize("command", ["eval --predictions", "eval --confusion", "interpolate-pos", "inspect", "plot", "consolidate"])
def test_a_disk_filling_up_while_writing_leaves_nothing_half_written(command, pretrained, folder, sharded, tmp_path,
                                                                     capsys, monkeypatch):
    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(paths, "os", OsWith(replace=full))
    out = tmp_path / "out"
    out.mkdir()
    args = writing_commands(pretrained, folder, sharded, out)[command]
    assert run_cli(*args) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "Free disk space" in err and "Traceback" not in err
    assert not [p for p in out.rglob("*") if p.is_file()], "no partial file is left behind"


def test_an_unwritable_datasets_cache_is_one_clear_error(folder, tmp_path, capsys, monkeypatch):
    blocker = file_in_the_way(tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", blocker / "cache")
    assert run_cli("bench", "--data", str(folder), "--res", "8", "--num-workers", "0", "--steps", "1",
                   "--batch-size", "4") == 2
    err = capsys.readouterr().err
    assert "datasets cache" in err and "HF_DATASETS_CACHE" in err and "Traceback" not in err


def test_unreadable_inputs_are_one_clear_error(tmp_path, capsys, monkeypatch):
    recipe = recipe_file(tmp_path)
    real = Path.read_text

    def read_text(path, *args, **kwargs):
        if path == recipe:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert run_cli("pretrain", str(recipe), "--out", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert str(recipe) in err and "cannot read (permission denied)" in err and "Traceback" not in err


# ---- 4. vitcli's own line instead of datasets' progress bars ------------------------------------------


def test_indexing_a_folder_prints_one_line_of_ours_and_none_of_datasets_bars(folder, tmp_path, capfd, monkeypatch):
    from helpers import make_ckpt

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "fresh-cache")  # nothing cached yet
    path = make_ckpt(tmp_path / "m.safetensors", num_classes=3, dataset=None)
    assert run_cli("eval", "--ckpt", str(path), "--dataset", str(folder), "--num-workers", "0") == 0
    out, err = capfd.readouterr()
    assert f"indexing 36 images in {folder}" in out + err
    assert "Generating" not in out + err and "Downloading" not in out + err and "examples/s" not in out + err
    assert datasets.is_progress_bar_enabled()  # Hub downloads keep their bars
