"""`vit finetune`, `vit interpolate-pos` and `vit eval` through the CLI, on a tiny digits run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from timm.layers import resample_abs_pos_embed

from vitcli.io import checkpoint as ckpt
from vitcli.engine.setup import build_model
from vitcli.models.load import load_checkpoint
from vitcli.recipe import load_recipe

from helpers import TINY, read_metrics, recipe_file, run_cli

DIGITS = [*sum((["--set", s] for s in TINY), []), "--set", "data.dataset=digits", "--set", "data.train_subset=96",
          "--set", "data.eval_subset=40", "--set", "model.img_size=8", "--set", "model.patch_size=2"]
FT = ["--set", "train.steps=4", "--set", "train.batch_size=16", "--set", "train.micro_batch_size=8", "--set", "train.eval_every=2",
      "--set", "data.num_workers=0", "--set", "data.train_subset=96", "--set", "data.eval_subset=40", "--set", "data.hflip=0.0",
      "--set", "schedule.warmup_steps=1"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pre")
    run = tmp / "run"
    assert run_cli("pretrain", str(recipe_file(tmp, "train: {steps: 6}\n")), "--out", str(run), *DIGITS) == 0
    return run


def test_finetune_at_higher_resolution_resamples_pos_embed_and_zeroes_the_head(pretrained, tmp_path):
    src = load_checkpoint(pretrained)
    recipe = load_recipe(None, ["train.steps=1", f"model.init_ckpt={pretrained}", "model.img_size=16", "data.dataset=digits"])
    model = build_model(recipe.model, num_classes=7, init=src)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    assert model.head.weight.shape == (7, 32)
    expected = resample_abs_pos_embed(src.state_dict["pos_embed"], new_size=(8, 8), old_size=(4, 4), num_prefix_tokens=1)
    assert torch.allclose(model.pos_embed, expected, atol=1e-6)
    # everything else is the pretrained weights
    assert torch.equal(model.state_dict()["blocks.1.mlp.fc2.weight"], src.state_dict["blocks.1.mlp.fc2.weight"])


def test_finetune_cli_defaults_to_the_checkpoints_data_set(pretrained, tmp_path):
    out = tmp_path / "ft"
    assert run_cli("finetune", "--ckpt", str(pretrained), "--res", "16", "--out", str(out), *FT) == 0
    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.data.dataset == "digits" and recipe.model.img_size == [16, 16]
    assert recipe.optim.name == "sgd" and recipe.optim.momentum == 0.9 and recipe.optim.weight_decay == 0.0
    assert recipe.schedule.decay == "cosine" and recipe.optim.clip_grad_norm == 1.0
    weights, meta = ckpt.read_weights(out / "checkpoints" / "last" / ckpt.WEIGHTS)
    assert meta["img_size"] == [16, 16] and weights["pos_embed"].shape == (1, 65, 32)
    assert [e["step"] for e in read_metrics(out) if e["kind"] == "eval"] == [2, 4]


def test_linear_probe_trains_only_the_head(pretrained, tmp_path):
    out = tmp_path / "probe"
    assert run_cli("finetune", "--ckpt", str(pretrained), "--linear-probe", "--out", str(out), *FT, "--set", "optim.lr=0.1") == 0
    before = load_checkpoint(pretrained).state_dict
    after, _ = ckpt.read_weights(out / "checkpoints" / "last" / ckpt.WEIGHTS)
    assert all(torch.equal(after[k], before[k]) for k in before if not k.startswith("head."))
    assert torch.count_nonzero(after["head.weight"]) > 0


def test_lr_sweep_picks_the_best_rate_on_held_out_data(pretrained, tmp_path):
    out = tmp_path / "sweep"
    assert run_cli("finetune", "--ckpt", str(pretrained), "--lr-sweep", "0.001,0.05", "--out", str(out), *FT) == 0
    scores = {}
    for lr in ("0.001", "0.05"):
        trial = out / "lr-sweep" / f"lr-{lr}"
        assert load_recipe(trial / "recipe.yaml").data.holdout == 0.1
        evals = [e for e in read_metrics(trial) if e["kind"] == "eval"]
        assert evals[-1]["num_images"] == 10  # 10% of the 96 training images, never the test split
        scores[float(lr)] = evals[-1]["top1"]
    chosen = load_recipe(out / "final" / "recipe.yaml").optim.lr
    assert scores[chosen] == max(scores.values())


def test_finetune_with_an_unknown_checkpoint_is_one_clear_error(tmp_path, capsys):
    assert run_cli("finetune", "--ckpt", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert "nope.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("res, grid, mode", [("16", (8, 8), "bicubic"), ("4", (2, 2), "bilinear"), ("16x24", (8, 12), "bicubic"),
                                             ("12", (6, 6), "nearest"), ("16", (8, 8), "area")])
def test_interpolate_pos_cli_equals_timm(pretrained, tmp_path, capsys, res, grid, mode):
    out = tmp_path / "new.safetensors"
    assert run_cli("interpolate-pos", "--ckpt", str(pretrained), "--res", res, "--mode", mode, "--out", str(out)) == 0
    assert f"4x4 (image 8x8, patch 2) -> {grid[0]}x{grid[1]}" in capsys.readouterr().out
    src = load_checkpoint(pretrained).state_dict
    new, meta = ckpt.read_weights(out)
    assert set(new) == set(src)
    expected = resample_abs_pos_embed(src["pos_embed"], new_size=grid, old_size=(4, 4), num_prefix_tokens=1, interpolation=mode,
                                      antialias=mode in ("bicubic", "bilinear"))
    assert torch.allclose(new["pos_embed"], expected, atol=1e-6)
    assert meta["img_size"] == [2 * grid[0], 2 * grid[1]]
    # the written file is itself a valid --ckpt
    assert load_checkpoint(out).meta.model_args["img_size"] == [2 * grid[0], 2 * grid[1]]


def test_interpolate_pos_with_patch_size_and_refusals(pretrained, tmp_path, capsys):
    out = tmp_path / "p4.safetensors"
    assert run_cli("interpolate-pos", "--ckpt", str(pretrained), "--res", "16", "--patch-size", "4", "--out", str(out)) == 0
    new, meta = ckpt.read_weights(out)
    assert new["patch_embed.proj.weight"].shape[-2:] == (4, 4) and new["pos_embed"].shape == (1, 17, 32)
    assert run_cli("interpolate-pos", "--ckpt", str(pretrained), "--res", "16", "--out", str(out)) == 2
    assert "exists" in capsys.readouterr().err
    assert run_cli("interpolate-pos", "--ckpt", str(pretrained), "--res", "big", "--out", str(tmp_path / "b.safetensors")) == 2
    assert "is not a resolution" in capsys.readouterr().err
    assert run_cli("interpolate-pos", "--ckpt", str(pretrained), "--res", "15", "--out", str(tmp_path / "c.safetensors")) == 2
    assert "not a multiple of the patch size" in capsys.readouterr().err


def test_eval_cli_json_on_the_run(pretrained, capsys):
    assert run_cli("eval", "--ckpt", str(pretrained), "--json", "--num-workers", "0") == 0
    result = json.loads(capsys.readouterr().out)
    assert {"top1", "top5", "loss", "num_images", "images_per_second"} <= set(result)
    assert result["num_images"] == 360 and 0 <= result["top1"] <= 1 and result["dataset"] == "digits"


def test_the_trained_head_is_kept_for_the_checkpoints_own_classes_unless_new_head(pretrained):
    from vitcli.engine.setup import keeps_head

    src = load_checkpoint(pretrained)
    names = src.meta.class_names
    assert src.meta.dataset == "digits" and len(names) == 10
    recipe = load_recipe(None, ["train.steps=1", f"model.init_ckpt={pretrained}", "model.img_size=16", "data.dataset=digits"])
    assert keeps_head(recipe.model, src, "digits", names)
    kept = build_model(recipe.model, num_classes=10, init=src, keep_head=True)
    assert torch.equal(kept.head.weight, src.state_dict["head.weight"])  # trained, not zero
    # --new-head, another data set, other class names: the paper's zero-initialised head
    forced = load_recipe(None, ["train.steps=1", f"model.init_ckpt={pretrained}", "data.dataset=digits", "model.new_head=true"])
    assert not keeps_head(forced.model, src, "digits", names)
    assert not keeps_head(recipe.model, src, "cifar10", names)
    assert not keeps_head(recipe.model, src, "digits", [f"d{i}" for i in range(10)])
    new = build_model(recipe.model, num_classes=10, init=src, keep_head=False)
    assert torch.count_nonzero(new.head.weight) == 0


def test_finetune_cli_says_it_keeps_the_head(pretrained, tmp_path, capsys):
    out = tmp_path / "kept"
    assert run_cli("finetune", "--ckpt", str(pretrained), "--out", str(out), *FT) == 0
    assert "Keeping the checkpoint's trained head" in capsys.readouterr().out
    assert run_cli("finetune", "--ckpt", str(pretrained), "--out", str(tmp_path / "new"), "--new-head", *FT) == 0
    assert "Keeping" not in capsys.readouterr().out
