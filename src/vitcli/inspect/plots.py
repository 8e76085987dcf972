"""`vit plot`: training loss, learning rate and evaluation top-1 against steps, several runs overlaid.

    curves = [read_curves(d) for d in ("runs/a", "runs/b")]
    plot_runs(curves, "compare.png")

Reads each run's metrics.jsonl (one JSON object per event: kind train / eval / checkpoint / skipped).
A line cut short by a kill is skipped; when a step was logged twice (a run resumed from an older
checkpoint by hand), the later record wins.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vitcli.errors import VitError
from vitcli.io.paths import writable_file
from vitcli.io.rundir import METRICS_FILE
from vitcli.inspect.figures import new_figure, save_figure

METRICS = METRICS_FILE
DEFAULT_NAME = "curves.png"


@dataclass
class RunCurves:
    """One run's curves, sorted by step; empty arrays when the run logged none of that kind."""

    name: str
    path: Path
    train_step: np.ndarray
    loss: np.ndarray
    lr: np.ndarray
    eval_step: np.ndarray
    top1: np.ndarray  # the evaluation accuracy: top-1, or for mpp / mae runs few-shot accuracy (see metric)
    bad_lines: int = 0
    notes: list[str] = field(default_factory=list)
    metric: str = "top1"  # "top1", or "fewshot_K" (the largest K a self-supervised run logged)

    @property
    def metric_label(self) -> str:
        return "top-1" if self.metric == "top1" else f"{self.metric.removeprefix('fewshot_')}-shot"


def _series(records: dict[int, dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    steps = sorted(s for s, r in records.items() if isinstance(r.get(key), (int, float)))
    return np.asarray(steps, dtype=np.int64), np.asarray([records[s][key] for s in steps], dtype=np.float64)


def read_curves(run_dir: str | Path, name: str | None = None) -> RunCurves:
    """Read RUN_DIR/metrics.jsonl; VitError when the folder or file is missing or holds no curves."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.exists():
        raise VitError(f"run directory {run_dir} does not exist")
    path = run_dir / METRICS if run_dir.is_dir() else run_dir
    if not path.is_file():
        inner = sorted(p.parent for p in run_dir.glob(f"*/**/{METRICS}"))[:4] if run_dir.is_dir() else []
        hint = (f"; runs inside it: {', '.join(str(p) for p in inner)}" if inner else
                "; pass a folder written by `vit pretrain` or `vit finetune`")
        raise VitError(f"{run_dir} has no {METRICS}, so it is not a training run{hint}")
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    bad = 0
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise VitError(f"could not read {path}: {getattr(e, 'strerror', None) or e}") from e
    for line in lines:
        if not line.strip():
            continue
        try:
            event = json.loads(line)
            step = int(event["step"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            bad += 1
            continue
        if event.get("kind", "train") == "train":
            train[step] = event
        elif event.get("kind") == "eval":
            evals[step] = event
    train_step, loss = _series(train, "loss")
    lr = np.asarray([float(train[s].get("lr", np.nan)) for s in train_step.tolist()], dtype=np.float64)
    metric = _accuracy_key(evals)
    eval_step, top1 = _series(evals, metric)
    if not len(train_step) and not len(eval_step):
        raise VitError(f"{path} holds no train or eval records yet (no loss, lr or top1 to plot); "
                       "wait for the run to log its first steps")
    curves = RunCurves(name or (run_dir.name if run_dir.is_dir() else run_dir.parent.name), run_dir, train_step,
                       loss, lr, eval_step, top1, bad, metric=metric)
    if bad:
        curves.notes.append(f"{path}: skipped {bad} unreadable line(s)")
    return curves


def _accuracy_key(evals: dict[int, dict]) -> str:
    """top1, else the largest few-shot K logged (a self-supervised run's evaluations)."""
    keys = {k for e in evals.values() for k in e}
    if "top1" in keys or not any(k.startswith("fewshot_") for k in keys):
        return "top1"
    return max((k for k in keys if k.startswith("fewshot_")), key=lambda k: int(k.removeprefix("fewshot_")))


def run_labels(paths: list[Path]) -> list[str]:
    """Short distinct labels: the folder names, with parents added where names repeat."""
    paths = [Path(p).expanduser().resolve() for p in paths]
    depth = 1
    while True:
        labels = ["/".join(p.parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels) or all(depth >= len(p.parts) for p in paths):
            return labels
        depth += 1


def plot_runs(curves: list[RunCurves], out: str | Path, title: str = "") -> Path:
    """Draw loss, learning rate and eval top-1 (or few-shot accuracy) (%) against steps, one colour per run, into `out`."""
    return save_figure(curves_figure(curves, title), out, "--out")


def curves_figure(curves: list[RunCurves], title: str = ""):
    """The matplotlib Figure of plot_runs: three panels (loss, lr, top-1 %), one line per run in each."""
    if not curves:
        raise VitError("vit plot needs at least one run directory")
    fig = new_figure(15.0, 4.3)
    axes = [fig.add_subplot(1, 3, i + 1) for i in range(3)]
    import matplotlib

    colours = matplotlib.colormaps["tab10" if len(curves) <= 10 else "tab20"]
    accuracy = " / ".join(sorted({c.metric_label for c in curves if len(c.eval_step)} or {"top-1"}))
    panels = (("training loss", "loss"), ("learning rate", "lr"), (f"eval {accuracy} (%)", "top1"))
    for i, c in enumerate(curves):
        colour = colours(i % colours.N)
        if len(c.train_step):
            axes[0].plot(c.train_step, c.loss, color=colour, linewidth=1.2, label=c.name)
            axes[1].plot(c.train_step, c.lr, color=colour, linewidth=1.2, label=c.name)
        if len(c.eval_step):
            best = int(np.argmax(c.top1))
            axes[2].plot(c.eval_step, 100 * c.top1, color=colour, linewidth=1.2, marker="o", markersize=2.5,
                         label=f"{c.name} (best {100 * c.top1[best]:.2f}%)")
    for ax, (label, key) in zip(axes, panels):
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"no {key} records", ha="center", va="center", transform=ax.transAxes, color="gray")
    losses = np.concatenate([c.loss for c in curves])
    if len(losses) and (losses > 0).all() and losses.max() > 20 * losses.min():
        axes[0].set_yscale("log")  # losses spanning decades read better on a log axis
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_command(run_dirs: list[str | Path], out: str | Path | None = None, title: str = "") -> tuple[Path, list[RunCurves]]:
    """`vit plot`: read every run, draw them overlaid. Default out: RUN_DIR/curves.png for one run,
    ./curves.png for several."""
    if not run_dirs:
        raise VitError("vit plot needs at least one run directory")
    folders = [Path(d).expanduser() for d in run_dirs]
    labels = run_labels([f.parent if f.is_file() else f for f in folders])
    curves = [read_curves(d, name) for d, name in zip(run_dirs, labels)]
    if out is None:
        first = Path(run_dirs[0]).expanduser()
        out = (first if first.is_dir() else first.parent) / DEFAULT_NAME if len(run_dirs) == 1 else Path(DEFAULT_NAME)
    out = Path(out)
    if out.is_dir():
        out = out / DEFAULT_NAME
    return plot_runs(curves, writable_file(out, "--out"), title), curves
