"""A training process stopped by SIGTERM saves, exits with code 3, and resumes to the same result."""

from __future__ import annotations

import json
import signal

import pytest

from helpers import ARGS, comparable, recipe_file, run_cli, start_training, train_steps









MAE = ["--set", "objective.name=mae", "--set", "objective.mae.decoder_dim=32", "--set", "objective.mae.decoder_depth=1",
       "--set", "objective.mae.decoder_heads=4"]


@pytest.mark.parametrize("objective", [[], MAE], ids=["supervised", "mae"])
@pytest.mark.slow
def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(tmp_path, objective):
    recipe = recipe_file(tmp_path, "train: {steps: 100}\n")
    cut = tmp_path / "cut"
    args = [*ARGS, *objective]
    proc = start_training(recipe, cut, args, until_step=20)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "Resume with" in err and "--resume" in err and "Traceback" not in err
    saved = train_steps(cut)
    assert 20 <= saved < 100
    assert (cut / "checkpoints" / f"step-{saved:08d}" / "state.pt").exists()  # saved where it stopped
    assert not (cut / "summary.json").exists()

    assert run_cli("pretrain", str(recipe), "--out", str(cut), "--resume", *args) == 0
    full = tmp_path / "full"
    assert run_cli("pretrain", str(recipe), "--out", str(full), *args) == 0
    assert comparable(cut) == comparable(full)
    a = json.loads((cut / "summary.json").read_text())
    b = json.loads((full / "summary.json").read_text())
    keys = ("final_top1", "best_top1", "steps", "best_score")
    assert [a.get(k) for k in keys] == [b.get(k) for k in keys]
