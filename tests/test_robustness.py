"""Never lose a run: kill -9 at random moments, a full disk, running out of GPU memory, Ctrl-C twice."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import pytest
import torch

from helpers import ARGS, comparable, recipe_file, run_cli, start_training, train_steps
from vitcli.io import checkpoint as ckpt


@pytest.mark.slow
def test_kill_9_at_random_moments_never_costs_the_run(tmp_path):
    """SIGKILL three times at random moments while checkpointing every step; each time the newest
    loadable checkpoint is found and the run resumes; the finished run equals an uninterrupted one."""
    recipe = recipe_file(tmp_path, "train: {steps: 40}\n")  # the kills land in its first ~12 steps
    args = [*ARGS, "--set", "train.checkpoint_every=1", "--set", "train.keep=2"]
    run = tmp_path / "killed"
    rng = random.Random(0)
    for attempt in range(3):
        proc = start_training(recipe, run, [*args, "--resume"] if attempt else args, until_step=train_steps(run) + 3,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0, 0.2))  # land anywhere: mid-step, mid-save, mid-log
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        found = ckpt.newest_loadable(run / "checkpoints", warn=lambda m: None)
        assert found is not None, f"attempt {attempt}: no loadable checkpoint after kill -9"
        assert not (run / "summary.json").exists()
    assert run_cli("pretrain", str(recipe), "--out", str(run), "--resume", *args) == 0
    full = tmp_path / "full"  # checkpoint frequency does not change the metrics, so save time here
    assert run_cli("pretrain", str(recipe), "--out", str(full), *ARGS) == 0
    assert comparable(run) == comparable(full)


def test_corrupted_newest_checkpoint_is_reported_and_the_previous_used(tmp_path, capsys):
    recipe = recipe_file(tmp_path, "train: {steps: 6}\n")
    args = [*ARGS, "--set", "train.checkpoint_every=2", "--set", "train.keep=5"]
    run = tmp_path / "run"
    assert run_cli("pretrain", str(recipe), "--out", str(run), *args) == 0
    newest = run / "checkpoints" / "step-00000006" / ckpt.WEIGHTS
    data = newest.read_bytes()
    cut = random.Random(1).randrange(1, len(data))
    newest.write_bytes(data[:cut])
    (run / "summary.json").unlink()
    capsys.readouterr()
    assert run_cli("pretrain", str(recipe), "--out", str(run), "--resume", *args) == 0
    out = capsys.readouterr().out
    assert "Skipping checkpoint step-00000006" in out and "from step-00000004" in out
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


def test_disk_full_while_saving_is_a_clear_error_and_the_previous_checkpoint_survives(tmp_path, capsys, monkeypatch):
    recipe = recipe_file(tmp_path, "train: {steps: 4}\n")
    args = [*ARGS, "--set", "train.checkpoint_every=1", "--set", "train.eval_every=100"]
    real_save = ckpt.save_file
    calls = {"n": 0}

    def save_file(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        return real_save(*a, **k)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    run = tmp_path / "run"
    assert run_cli("pretrain", str(recipe), "--out", str(run), *args) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "Free disk space" in err and "--resume" in err
    found = ckpt.newest_loadable(run / "checkpoints")
    assert found.step == 2 and found.state["step"] == 2
    assert not list((run / "checkpoints").glob(".tmp*")), "the half-written checkpoint is cleaned up"


def test_out_of_gpu_memory_says_what_to_change(tmp_path, capsys, monkeypatch):
    from vitcli.models import vit

    def oom(self, x):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(vit.VisionTransformer, "forward", oom)
    assert run_cli("pretrain", str(recipe_file(tmp_path, "train: {steps: 2}\n")), "--out", str(tmp_path / "r"), *ARGS) == 2
    err = capsys.readouterr().err
    assert "ran out of memory" in err and "micro_batch_size" in err and "Traceback" not in err


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(tmp_path):
    recipe = recipe_file(tmp_path, "train: {steps: 100000}\n")
    run = tmp_path / "run"
    proc = start_training(recipe, run, ARGS, until_step=3)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (3, 130), err  # 3 if the first one's checkpoint finished first
    assert "Traceback" not in err and "--resume" in err
