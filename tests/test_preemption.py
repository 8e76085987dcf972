"""A training process stopped by SIGTERM saves, exits with code 3, and resumes to the same result."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_pretrain import TINY, read_metrics, recipe_file, run_cli

ARGS = [*sum((["--set", s] for s in TINY), []), "--set", "data.dataset=digits", "--set", "data.train_subset=256",
        "--set", "data.eval_subset=40", "--set", "model.img_size=8", "--set", "model.patch_size=2",
        "--set", "train.batch_size=16", "--set", "train.eval_every=100", "--set", "model.drop_rate=0.1"]


def comparable(run: Path) -> list[dict]:
    drop = ("time", "images_per_second", "wall_seconds", "path")
    return [{k: v for k, v in e.items() if k not in drop} for e in read_metrics(run) if e["kind"] in ("train", "eval")]


def train_steps(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(line)["step"] for line in lines if line.endswith("}") and '"kind": "train"' in line]
    return max(steps, default=0)


def start_training(recipe: Path, run: Path, args: list[str], *, until_step: int, **popen) -> subprocess.Popen:
    """`vit pretrain` in a subprocess, returned once metrics.jsonl shows `until_step` (or it ended)."""
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, **popen}
    proc = subprocess.Popen([sys.executable, "-m", "vitcli", "pretrain", str(recipe), "--out", str(run), *args], **popen)
    deadline = time.time() + 120
    while train_steps(run) < until_step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    return proc


MAE = ["--set", "objective.name=mae", "--set", "objective.decoder_dim=32", "--set", "objective.decoder_depth=1",
       "--set", "objective.decoder_heads=4"]


@pytest.mark.parametrize("objective", [[], MAE], ids=["supervised", "mae"])
def test_sigterm_saves_and_resume_matches_an_uninterrupted_run(tmp_path, objective):
    recipe = recipe_file(tmp_path, "train: {steps: 300}\n")
    cut = tmp_path / "cut"
    args = [*ARGS, *objective]
    proc = start_training(recipe, cut, args, until_step=20)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "Resume with" in err and "--resume" in err and "Traceback" not in err
    saved = train_steps(cut)
    assert 20 <= saved < 300
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
