"""`vit pretrain` with objective mpp / mae end to end: without labels, with few-shot evaluation where
there are labels, checkpoints of the encoder alone, exact resume with the objective's own state, and
the rest of vitcli (finetune, eval, inspect, bench, EMA, compile) on their checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer as TimmViT

from vitcli.io import checkpoint as ckpt
from vitcli.recipe import load_recipe

from helpers import TINY, comparable, offline_env, read_metrics, recipe_file, run_cli

SETS = [x for s in TINY for x in ("--set", s)]
DIGITS = [*SETS, "--set", "data.dataset=digits", "--set", "data.train_subset=96", "--set", "data.eval_subset=40",
          "--set", "model.img_size=8", "--set", "model.patch_size=2", "--set", "train.eval_every=4"]
MAE = ["--set", "objective.name=mae", "--set", "objective.mae.decoder_dim=32", "--set", "objective.mae.decoder_depth=1",
       "--set", "objective.mae.decoder_heads=4"]
MPP = ["--set", "objective.name=mpp"]


def weights(run: Path, step: int) -> tuple[dict, dict]:
    d = run / "checkpoints" / f"step-{step:08d}"
    return ckpt.read_weights(d / ckpt.WEIGHTS)[0], ckpt.read_state(d / ckpt.STATE)


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("mae")
    with offline_env():
        assert run_cli("pretrain", str(recipe_file(tmp, "train: {steps: 8}\n")), "--out", str(tmp / "run"), *DIGITS, *MAE,
                       "--set", "objective.fewshot=[1,2]") == 0
    return tmp / "run"


def test_mae_on_labelled_digits_reports_loss_and_fewshot_and_saves_the_encoder_alone(mae_run):
    evals = [e for e in read_metrics(mae_run) if e["kind"] == "eval"]
    assert [e["step"] for e in evals] == [4, 8]
    assert all({"loss", "fewshot_1", "fewshot_2", "num_images"} <= set(e) and "top1" not in e for e in evals)
    assert all(0 <= e["fewshot_2"] <= 1 and e["loss"] > 0 and e["num_images"] == 40 for e in evals)
    summary = json.loads((mae_run / "summary.json").read_text())
    assert summary["objective"] == "mae" and summary["best_metric"] == "fewshot_2" and summary["best_top1"] is None
    assert summary["best_score"] == max(e["fewshot_2"] for e in evals)
    encoder, state = weights(mae_run, 8)
    assert not any(k.startswith(("head.", "decoder", "model.")) for k in encoder)
    assert "decoder.mask_token" in state["objective"] and "decoder.pred.weight" in state["objective"]
    _, meta = ckpt.read_weights(mae_run / "checkpoints" / "last" / ckpt.WEIGHTS)
    assert meta["objective"] == "mae" and meta["num_classes"] == 0
    vit = TimmViT(img_size=8, patch_size=2, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    vit.load_state_dict(encoder, strict=True)


def test_mae_resumes_exactly_with_its_decoder(mae_run, tmp_path):
    cut = tmp_path / "cut"
    args = [*DIGITS, *MAE, "--set", "objective.fewshot=[1,2]", "--set", "train.keep=5"]
    recipe = recipe_file(tmp_path, "train: {steps: 8}\n")
    assert run_cli("pretrain", str(recipe), "--out", str(cut), *args) == 0
    shutil.rmtree(cut / "checkpoints" / "step-00000008")
    (cut / "checkpoints" / "last").unlink()
    (cut / "summary.json").unlink()
    assert run_cli("pretrain", str(recipe), "--out", str(cut), "--resume", *args) == 0
    full = tmp_path / "full"
    assert run_cli("pretrain", str(recipe), "--out", str(full), *args) == 0
    (a, sa), (b, sb) = weights(cut, 8), weights(full, 8)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(sa["objective"][k], sb["objective"][k]) for k in sb["objective"])
    assert comparable(cut) == comparable(full)


@pytest.fixture(scope="module")
def flat_folder(tmp_path_factory) -> Path:
    """A folder of images and nothing else: no class sub-folders, so no labels."""
    root = tmp_path_factory.mktemp("flat") / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


@pytest.mark.parametrize("objective", [MAE, MPP])
def test_self_supervised_objectives_need_no_labels(objective, flat_folder, tmp_path):
    run = tmp_path / "run"
    base = [*SETS, "--set", f"data.dataset={flat_folder}", "--set", "model.img_size=8", "--set", "model.patch_size=2",
            "--set", "train.eval_every=2"]
    assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 4}\n")), "--out", str(run), *base, *objective) == 0
    evals = [e for e in read_metrics(run) if e["kind"] == "eval"]
    assert len(evals) == 2 and all(set(e) >= {"loss"} and not any(k.startswith("fewshot") for k in e) for e in evals)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["best_metric"] == "loss" and summary["best_score"] == -min(e["loss"] for e in evals)
    # the supervised objective on the same folder is refused: it needs labels
    assert run_cli("pretrain", str(recipe_file(tmp_path)), "--out", str(tmp_path / "sup"), *base) == 2


def test_mpp_reads_a_hub_set_without_a_label_column(tmp_path):
    rng = np.random.default_rng(1)
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(30)]},
                                    features=datasets.Features({"image": datasets.Image()}))
    root = tmp_path / "unlabelled"
    datasets.DatasetDict({"train": ds}).save_to_disk(str(root))
    run = tmp_path / "run"
    assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 2}\n")), "--out", str(run), *SETS, *MPP,
                   "--set", f"data.dataset={root}", "--set", "model.img_size=8", "--set", "model.patch_size=2") == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 2


def test_finetune_from_mae_takes_maes_defaults_and_trains_a_new_head(mae_run, tmp_path, capsys):
    out = tmp_path / "ft"
    assert run_cli("finetune", "--ckpt", str(mae_run), "--out", str(out), "--set", "train.steps=2",
                   "--set", "data.train_subset=144", "--set", "data.eval_subset=40") == 0
    assert "MAE's fine-tuning defaults" in capsys.readouterr().out
    recipe = load_recipe(out / "recipe.yaml")
    assert recipe.optim.layer_decay == 0.65 and recipe.model.global_pool == "avg"
    tuned, meta = ckpt.read_weights(out / "checkpoints" / "last" / ckpt.WEIGHTS)
    encoder, _ = ckpt.read_weights(mae_run / "checkpoints" / "best" / ckpt.WEIGHTS)
    assert meta["num_classes"] == 10 and meta["model_args"]["global_pool"] == "avg"
    assert "fc_norm.weight" in tuned and "norm.weight" not in tuned  # the trained final norm, now after the pool
    # --set wins over MAE's defaults
    out2 = tmp_path / "ft2"
    assert run_cli("finetune", "--ckpt", str(mae_run), "--out", str(out2), "--set", "train.steps=1",
                   "--set", "optim.layer_decay=0.9", "--set", "data.train_subset=144") == 0
    assert load_recipe(out2 / "recipe.yaml").optim.layer_decay == 0.9
    assert set(encoder) - {"norm.weight", "norm.bias"} <= set(tuned)


def test_eval_fewshot_and_inspect_take_an_mae_checkpoint(mae_run, tmp_path, capsys):
    assert run_cli("eval", "--ckpt", str(mae_run), "--fewshot", "1,5", "--num-workers", "0", "--json") == 0
    r = json.loads(capsys.readouterr().out)
    assert r["top1"] is None and set(r["fewshot"]) == {"1", "5"}
    out = tmp_path / "figs"
    assert run_cli("inspect", "--ckpt", str(mae_run), "--out", str(out), "--images", "16", "--show", "4") == 0
    with Image.open(out / "mae_fig2_reconstruction.png") as img:
        assert img.format == "PNG" and img.size[0] > 200


@pytest.mark.parametrize("objective", ["mae", "mpp"])
def test_bench_times_the_objectives_step(objective, capsys):
    assert run_cli("bench", "vit_pico", "--objective", objective, "--steps", "2", "--warmup", "1", "--batch-size", "4",
                   "--json") == 0
    r = json.loads(capsys.readouterr().out)
    assert r["objective"] == objective and r["vitcli"]["images_per_second"] > 0 and r["vitcli"]["flops_per_step"] > 0
    assert run_cli("bench", "vit_pico", "--objective", objective, "--compare", "timm") == 2


@pytest.mark.parametrize("extra", [["--set", "train.ema_decay=0.5"], ["--set", "train.compile=true"]], ids=["ema", "compile"])
@pytest.mark.parametrize("objective", [MAE, MPP], ids=["mae", "mpp"])
def test_ema_and_compile_train_both_objectives(objective, extra, tmp_path):
    run = tmp_path / "run"
    assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 2}\n")), "--out", str(run), *DIGITS, *objective,
                   *extra, "--set", "train.eval_every=2", "--set", "objective.fewshot=[1]") == 0
    losses = [e["loss"] for e in read_metrics(run) if e["kind"] in ("train", "eval")]
    assert losses and all(np.isfinite(losses))


@pytest.mark.parametrize("setting, message", [
    ("objective.mae.mask_ratio=1.5", "'objective.mae.mask_ratio' must be in (0, 1)"),
    ("objective.mpp.mask_ratio=0", "'objective.mpp.mask_ratio' must be in (0, 1)"),
    ("objective.mae.decoder_heads=5", "must be divisible by objective.mae.decoder_heads"),
    ("objective.mpp.target=downsized", "divisible by 4"),
    ("objective.mpp.replace=[0.5,0.5,0.5]", "summing to 1"),
    ("objective.mask_ratio=0", "'objective.mae.mask_ratio' must be in (0, 1)"),  # earlier versions' flat key
])
def test_bad_objective_settings_are_one_clear_error(setting, message, tmp_path, capsys):
    run = tmp_path / "run"
    base = MPP if "mpp" in setting else MAE
    assert run_cli("pretrain", str(recipe_file(tmp_path)), "--out", str(run), *DIGITS, *base, "--set", setting) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and not run.exists()


def test_plot_draws_the_fewshot_curve_of_a_self_supervised_run(mae_run, tmp_path, capsys):
    from vitcli.inspect.plots import read_curves

    curves = read_curves(mae_run)
    evals = [e for e in read_metrics(mae_run) if e["kind"] == "eval"]
    assert curves.metric == "fewshot_2" and list(curves.top1) == [e["fewshot_2"] for e in evals]
    assert run_cli("plot", str(mae_run), "--out", str(tmp_path / "c.png")) == 0
    assert "best 2-shot" in capsys.readouterr().out and (tmp_path / "c.png").stat().st_size > 0
