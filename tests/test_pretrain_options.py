"""Training options end to end: EMA, trackers, augmentation, compile, bad steps."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from vitcli.io import checkpoint as ckpt

from helpers import TINY, read_metrics, recipe_file, run_cli

DIGITS = [*sum((["--set", s] for s in TINY), []), "--set", "data.dataset=digits", "--set", "data.train_subset=64",
          "--set", "data.eval_subset=16", "--set", "model.img_size=8", "--set", "model.patch_size=2"]


def test_ema_weights_are_the_saved_model_and_raw_weights_resume(tmp_path):
    run = tmp_path / "ema"
    assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 4}\n")), "--out", str(run), *DIGITS,
                   "--set", "train.ema_decay=0.5") == 0
    ema, _ = ckpt.read_weights(run / "checkpoints" / "last" / ckpt.WEIGHTS)
    state = ckpt.read_state(run / "checkpoints" / "last" / ckpt.STATE)
    raw = state["model"]
    assert set(raw) == set(ema)
    # with decay 0.5 the average lags the raw weights: they differ, but not wildly
    k = "blocks.0.mlp.fc1.weight"
    assert not torch.equal(raw[k], ema[k])
    assert (raw[k] - ema[k]).abs().max() < 0.1


def test_tensorboard_gets_the_same_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 3}\n")), "--out", str(run), *DIGITS,
                   "--set", "train.tensorboard=true") == 0
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    losses = [s.value for s in acc.Scalars("train/loss")]
    expected = [e["loss"] for e in read_metrics(run) if e["kind"] == "train"]
    assert losses == pytest.approx(expected, rel=1e-6)
    assert [s.step for s in acc.Scalars("eval/top1")] == [3]


def test_wandb_is_used_when_installed_and_asked_for(tmp_path, monkeypatch):
    calls = {"log": [], "init": None, "finished": False}

    class FakeRun:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finished"] = True

    def init(**kwargs):
        calls["init"] = kwargs
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))
    run = tmp_path / "wb"
    assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 2}\n")), "--out", str(run), *DIGITS,
                   "--set", "train.wandb=my-project") == 0
    assert calls["init"]["project"] == "my-project" and calls["init"]["config"]["train"]["steps"] == 2
    assert calls["finished"]
    steps = [s for s, d in calls["log"] if "train/loss" in d]
    assert steps == [1, 2]


def test_wandb_asked_for_but_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 2}\n")), "--out", str(tmp_path / "r"), *DIGITS,
                   "--set", "train.wandb=p") == 2
    assert "wandb is not installed" in capsys.readouterr().err


def test_full_augmentation_stack_trains(tmp_path):
    """RandAugment, random erasing, Mixup+CutMix with label smoothing: the soft-target loss is used."""
    run = tmp_path / "aug"
    assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 3}\n")), "--out", str(run), *DIGITS,
                   "--set", "data.randaugment=rand-m9-mstd0.5", "--set", "data.random_erasing=0.25",
                   "--set", "data.mixup=0.8", "--set", "data.cutmix=1.0", "--set", "data.label_smoothing=0.1") == 0
    losses = [e["loss"] for e in read_metrics(run) if e["kind"] == "train"]
    assert len(losses) == 3 and all(0 < v < 10 for v in losses)


def test_non_finite_losses_skip_steps_then_stop_keeping_the_last_good_checkpoint(tmp_path, capsys):
    run = tmp_path / "nan"
    # lr 1e30 blows the weights up after the first update; every later loss is non-finite
    code = run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 20}\n")), "--out", str(run), *DIGITS,
                   "--set", "optim.lr=1e30", "--set", "optim.clip_grad_norm=null", "--set", "schedule.warmup_steps=0",
                   "--set", "train.max_bad_steps=3", "--set", "train.checkpoint_every=1")
    assert code == 2
    err = capsys.readouterr().err
    assert "3 steps in a row had a non-finite loss" in err and "Traceback" not in err
    skipped = [e for e in read_metrics(run) if e["kind"] == "skipped"]
    assert len(skipped) == 3
    found = ckpt.newest_loadable(run / "checkpoints")
    assert found is not None and found.step < skipped[0]["step"]


@pytest.mark.slow
def test_torch_compile_trains_like_eager(tmp_path):
    """torch.compile (inductor on CPU) gives the eager losses within float tolerance."""
    losses = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        run = tmp_path / name
        assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 2}\n")), "--out", str(run), *DIGITS,
                       "--set", f"train.compile={flag}") == 0
        losses[name] = [e["loss"] for e in read_metrics(run) if e["kind"] == "train"]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3)


def test_keep_bounds_the_step_checkpoints(tmp_path):
    run = tmp_path / "keep"
    assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 6}\n")), "--out", str(run), *DIGITS,
                   "--set", "train.checkpoint_every=1", "--set", "train.eval_every=100", "--keep", "2") == 0
    steps = sorted(c.step for c in ckpt.step_dirs(run / "checkpoints"))
    # last (6) and best (6, the only evaluation) plus the two newest others
    assert steps == [4, 5, 6]
