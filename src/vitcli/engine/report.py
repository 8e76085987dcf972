"""What `vit eval` shows and writes: the rich table, the predictions CSV and the confusion-matrix picture."""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitcli.errors import VitError
from vitcli.io.paths import atomic_write, writable_file

TICK_LABELS_UP_TO = 30  # more classes: the confusion matrix is drawn without class names
ANNOTATE_UP_TO = 12  # up to this many classes each cell shows its count
MAX_CONFUSION_CELLS = 1000  # more classes are grouped into this many consecutive bins per axis
WORST_SHOWN = 5


class PredictionLog:
    """An `evaluate(..., on_batch=...)` callback keeping each image's label, top-5 classes and confidence."""

    def __init__(self) -> None:
        self._labels: list[torch.Tensor] = []
        self._top: list[torch.Tensor] = []
        self._conf: list[torch.Tensor] = []

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        probs = logits.float().softmax(dim=1)
        conf, top = probs.topk(min(5, probs.shape[1]), dim=1)
        self._labels.append(labels.cpu())
        self._top.append(top.cpu())
        self._conf.append(conf[:, 0].cpu())

    @property
    def labels(self) -> np.ndarray:
        return torch.cat(self._labels).numpy() if self._labels else np.zeros(0, dtype=np.int64)

    @property
    def top(self) -> np.ndarray:
        return torch.cat(self._top).numpy() if self._top else np.zeros((0, 5), dtype=np.int64)

    @property
    def predictions(self) -> np.ndarray:
        return self.top[:, 0]

    @property
    def confidence(self) -> np.ndarray:
        return torch.cat(self._conf).numpy() if self._conf else np.zeros(0, dtype=np.float32)


def figure_path(path: Path, what: str) -> Path:
    """A picture destination checked before any work: writable, and a format matplotlib writes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = writable_file(path, what)
    if path.suffix.lower().lstrip(".") not in FigureCanvasAgg.get_supported_filetypes():
        raise VitError(f"{what} {path}: unknown image format {path.suffix or '(none)'}; use a .png file name")
    return path


def write_predictions(path: Path, log: PredictionLog, class_names: list[str] | None = None) -> Path:
    """One CSV row per image, in evaluation order:
    index, label, prediction, correct, confidence (softmax of the prediction), top5 (space-separated ids),
    plus label_name / prediction_name when the classes have names."""
    labels, top, conf = log.labels, log.top, log.confidence
    named = bool(class_names)
    header = ["index", "label", "prediction", "correct", "confidence", "top5"]
    if named:
        header += ["label_name", "prediction_name"]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            for i, (y, t, c) in enumerate(zip(labels.tolist(), top.tolist(), conf.tolist())):
                row = [i, y, t[0], int(y == t[0]), f"{c:.6f}", " ".join(map(str, t))]
                if named:
                    row += [class_names[y], class_names[t[0]]]
                w.writerow(row)

    return atomic_write(writable_file(path, "--predictions"), write, "--predictions")


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int,
                     max_cells: int = MAX_CONFUSION_CELLS) -> tuple[np.ndarray, int]:
    """(counts[true, predicted], classes per cell); above max_cells classes, consecutive classes share
    a cell so the matrix stays max_cells x max_cells."""
    group = max(1, math.ceil(num_classes / max_cells))
    cells = math.ceil(num_classes / group)
    flat = (np.asarray(labels) // group) * cells + np.asarray(predictions) // group
    return np.bincount(flat, minlength=cells * cells).reshape(cells, cells), group


def draw_confusion(path: Path, labels: np.ndarray, predictions: np.ndarray, num_classes: int,
                   class_names: list[str] | None = None, title: str = "") -> Path:
    """Draw the row-normalised confusion matrix (each true class sums to 1) to an image file
    (.png, or any format matplotlib writes: .pdf, .svg, ...). Headless: no pyplot, no display."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise VitError("--confusion needs matplotlib: pip install matplotlib") from e
    path = figure_path(path, "--confusion")
    counts, group = confusion_matrix(labels, predictions, num_classes)
    cells = len(counts)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)

    side = min(14.0, max(5.0, 0.3 * cells + 2.5)) if cells <= TICK_LABELS_UP_TO else 9.0
    fig = Figure(figsize=(side + 1.2, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    unit = "" if group == 1 else f" (classes grouped {group} per cell)"
    ax.set_xlabel(f"predicted class{unit}")
    ax.set_ylabel(f"true class{unit}")
    if title:
        ax.set_title(title)
    if cells <= TICK_LABELS_UP_TO:
        names = class_names if class_names and len(class_names) == cells else [str(i) for i in range(cells)]
        ax.set_xticks(range(cells), labels=names, rotation=90 if max(map(len, names)) > 2 else 0)
        ax.set_yticks(range(cells), labels=names)
        if cells <= ANNOTATE_UP_TO:
            for i in range(cells):
                for j in range(cells):
                    if counts[i, j]:
                        ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                                color="white" if share[i, j] > 0.5 else "black")
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120), "--confusion")


# ---------------------------------------------------------------------------------------------------
# The table


def worst_classes(per_class: list[float | None], class_names: list[str] | None, n: int = WORST_SHOWN
                  ) -> list[tuple[str, float]]:
    """The n classes with the lowest accuracy (classes without evaluation images skipped), by name."""
    scored = [(acc, i) for i, acc in enumerate(per_class) if acc is not None and not math.isnan(acc)]
    scored.sort()
    names = class_names if class_names and len(class_names) == len(per_class) else None
    return [(names[i] if names else f"class {i}", acc) for acc, i in scored[:n]]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def print_eval(result: dict[str, Any], console=None) -> None:
    """Render a `run_eval` result as a rich table (a new Console on stdout when none is given)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console()
    size = result.get("img_size")
    size_txt = f"{size[0]}x{size[1]}" if isinstance(size, (list, tuple)) and len(size) == 2 else str(size)
    table = Table(title=escape(f"{result.get('dataset')} [{result.get('split')}] @ {size_txt}"), show_header=False,
                  title_justify="left")
    table.add_column("metric", style="bold")
    table.add_column("value", justify="right")
    table.add_row("checkpoint", escape(str(result.get("checkpoint"))))
    if result.get("top1") is not None:
        table.add_row("top-1", _pct(result["top1"]))
        table.add_row("top-5", _pct(result["top5"]))
        if result.get("balanced_accuracy") is not None:
            table.add_row("balanced accuracy", _pct(result["balanced_accuracy"]))
        table.add_row("loss", f"{result['loss']:.4f}")
        table.add_row("ECE", f"{result['ece']:.4f}")
    if result.get("task") == "multilabel":
        table.add_row("mAP", _pct(result["map"]))
        table.add_row(f"F1 at threshold {result['threshold']:.2f}", _pct(result["f1"]))
        table.add_row("mean BCE", f"{result['loss']:.4f}")
        aps = [(a, n) for a, n in zip(result["per_class_ap"], result.get("class_names") or []) if a is not None]
        if len(aps) > 1:
            table.add_row(f"lowest AP ({min(len(aps), WORST_SHOWN)} classes)",
                          escape(", ".join(f"{n}: {_pct(a)}" for a, n in sorted(aps)[:WORST_SHOWN])))
    if result.get("task") == "segmentation":
        table.add_row("mIoU", _pct(result["miou"]))
        table.add_row("pixel accuracy", _pct(result["pixel_accuracy"]))
        table.add_row("mean accuracy", _pct(result["mean_accuracy"]))
        ious = [(a, n) for a, n in zip(result["per_class_iou"], result.get("class_names") or []) if a is not None]
        if len(ious) > 1:
            table.add_row(f"lowest IoU ({min(len(ious), WORST_SHOWN)} classes)",
                          escape(", ".join(f"{n}: {_pct(a)}" for a, n in sorted(ious)[:WORST_SHOWN])))
        scales = "" if result["scales"] == [1.0] else f", scales {result['scales']} with flips"
        table.add_row("windows", f"{result['window']} px every {result['window_stride']} px{scales}")
    table.add_row("images", f"{result.get('num_images', 0):,}")
    table.add_row("images/s", f"{result.get('images_per_second', 0.0):,.1f}")

    per_class = result.get("per_class_accuracy") or []
    present = [a for a in per_class if a is not None and not math.isnan(a)]
    if present and result.get("top1") is not None:
        table.add_row("per-class accuracy", f"mean {_pct(float(np.mean(present)))}, "
                                            f"min {_pct(min(present))}, max {_pct(max(present))}")
        worst = worst_classes(per_class, result.get("class_names"))
        if worst and len(present) > 1:
            table.add_row(f"worst {len(worst)} classes", escape(", ".join(f"{name}: {_pct(acc)}" for name, acc in worst)))
    for k, acc in (result.get("fewshot") or {}).items():
        table.add_row(f"{k}-shot linear", _pct(acc))
    for k, acc in (result.get("knn") or {}).items():
        table.add_row(f"{k}-NN", _pct(acc))
    if result.get("linear_probe"):
        probe = result["linear_probe"]
        table.add_row(f"linear probe ({probe['protocol']})", f"{_pct(probe['accuracy'])} at lr {probe['lr']:g}")
    for key, label in (("predictions", "predictions"), ("confusion", "confusion matrix")):
        if result.get(key):
            table.add_row(label, escape(str(result[key])))
    console.print(table)
