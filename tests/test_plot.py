"""`vit plot`: curves read from metrics.jsonl, several runs overlaid, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitcli.errors import VitError
from vitcli.inspect.plots import curves_figure, plot_command, read_curves, run_labels

from helpers import run_cli


def write_run(folder: Path, steps: int = 40, lr: float = 1e-3, seed: int = 0, extra: list[str] = ()) -> Path:
    """A run directory whose metrics.jsonl looks like the trainer's: train every 5 steps, eval every 10."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    lines = []
    for step in range(5, steps + 1, 5):
        lines.append(json.dumps({"time": 0.0, "kind": "train", "step": step, "epoch": step / 10, "lr": lr * step / steps,
                                 "loss": 2.3 / step + rng.random() * 1e-3, "grad_norm": 1.0}))
        if step % 10 == 0:
            lines.append(json.dumps({"kind": "eval", "step": step, "top1": step / (steps + 10), "top5": 1.0}))
            lines.append(json.dumps({"kind": "checkpoint", "step": step, "path": "x"}))
    lines.append(json.dumps({"kind": "skipped", "step": 3, "loss": 1e9, "grad_norm": 1e9}))
    (folder / "metrics.jsonl").write_text("\n".join([*lines, *extra]) + "\n")
    return folder


def test_read_curves_takes_train_and_eval_records_in_step_order(tmp_path):
    run = write_run(tmp_path / "a", extra=[
        json.dumps({"kind": "train", "step": 20, "lr": 7.0, "loss": 9.0}),  # logged again later: this one wins
        '{"kind": "train", "step": 45, "lo',  # cut short by a kill
    ])
    c = read_curves(run)
    assert c.train_step.tolist() == [5, 10, 15, 20, 25, 30, 35, 40]
    assert c.eval_step.tolist() == [10, 20, 30, 40]
    np.testing.assert_allclose(c.top1, [10 / 50, 20 / 50, 30 / 50, 40 / 50])
    assert c.loss[3] == 9.0 and c.lr[3] == 7.0
    np.testing.assert_allclose(c.lr[[0, 7]], [1e-3 * 5 / 40, 1e-3])
    assert 1e9 not in c.loss  # skipped steps are not training curve points
    assert c.bad_lines == 1 and "1 unreadable" in c.notes[0]


def test_several_runs_are_drawn_overlaid(tmp_path):
    runs = [write_run(tmp_path / name, steps=s, lr=lr, seed=i)
            for i, (name, s, lr) in enumerate([("small", 40, 1e-3), ("big", 60, 3e-3), ("other", 20, 1e-2)])]
    curves = [read_curves(r) for r in runs]
    fig = curves_figure(curves)
    loss_ax, lr_ax, top1_ax = fig.axes[:3]
    for ax in (loss_ax, lr_ax, top1_ax):
        assert len(ax.lines) == 3
        assert [t.get_text().split(" ")[0] for t in ax.get_legend().get_texts()] == ["small", "big", "other"]
    for line, c in zip(top1_ax.lines, curves):
        np.testing.assert_allclose(line.get_xdata(), c.eval_step)
        np.testing.assert_allclose(line.get_ydata(), 100 * c.top1)
    np.testing.assert_allclose(lr_ax.lines[1].get_ydata(), curves[1].lr)
    assert len({tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
                for line in loss_ax.lines}) == 3

    path, _ = plot_command(runs, tmp_path / "all.png", title="three runs")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= 1200 and 400 <= img.size[1] <= 800


def test_default_output_and_cli(tmp_path, capsys, monkeypatch):
    a = write_run(tmp_path / "runs" / "a")
    b = write_run(tmp_path / "other" / "a", seed=1)  # same folder name: labels take the parent too
    assert run_labels([a, b]) == ["runs/a", "other/a"]
    assert run_cli("plot", str(a)) == 0
    assert (a / "curves.png").is_file()
    out = capsys.readouterr().out
    assert "8 train and 4 eval records, best top-1 80.00%" in out and "curves.png" in out
    monkeypatch.chdir(tmp_path)
    assert run_cli("plot", str(a), str(b)) == 0
    with Image.open(tmp_path / "curves.png") as img:
        assert img.size[0] > img.size[1] > 200


def test_a_folder_without_metrics_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitError, match="has no metrics.jsonl, so it is not a training run"):
        read_curves(tmp_path / "empty")
    assert run_cli("plot", str(tmp_path / "empty")) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "has no metrics.jsonl" in err and "Traceback" not in err
    assert run_cli("plot", str(tmp_path / "nowhere")) == 2
    assert "does not exist" in capsys.readouterr().err

    # a folder of runs (e.g. an lr sweep) names the runs inside it
    write_run(tmp_path / "sweep" / "lr-sweep" / "lr-0.01")
    with pytest.raises(VitError, match="lr-0.01"):
        read_curves(tmp_path / "sweep")
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "metrics.jsonl").write_text(json.dumps({"kind": "checkpoint", "step": 0}) + "\n")
    with pytest.raises(VitError, match="no train or eval records"):
        read_curves(tmp_path / "fresh")
    with pytest.raises(VitError, match="unknown image format"):
        plot_command([tmp_path / "sweep" / "lr-sweep" / "lr-0.01"], tmp_path / "x.nope")
