"""Drawing the paper's inspection figures with matplotlib's object API (Agg canvas; no pyplot, no global
state, no display). Each function takes the numbers from `vitcli.inspect.features` and writes one file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from vitcli.errors import VitError
from vitcli.io.paths import atomic_write


def new_figure(width: float, height: float):
    """A matplotlib Figure on its own Agg canvas (headless; nothing registered with pyplot)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - matplotlib is a dependency
        raise VitError("drawing figures needs matplotlib: pip install matplotlib") from e
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path, what: str = "figure", dpi: int = 120) -> Path:
    """Write fig to path (.png, or any format matplotlib writes); VitError on an unknown format or I/O error."""
    path = Path(path).expanduser()
    if path.suffix.lower().lstrip(".") not in fig.canvas.get_supported_filetypes():
        raise VitError(f"{what} {path}: unknown image format {path.suffix or '(none)'}; use a .png file name")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi), what)


def _as_image(x: np.ndarray) -> np.ndarray:
    """(C, h, w) -> what imshow wants: (h, w) for one channel, (h, w, 3) for three, first channel otherwise."""
    if x.shape[0] == 3:
        return np.moveaxis(x, 0, -1)
    return x[0]


def _unit_range(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.full_like(x, 0.5)


def draw_filters(path: Path, components: np.ndarray, explained: np.ndarray, title: str = "") -> Path:
    """Fig. 7 left: the principal components (k, C, p, p) of the patch-embedding filters, each scaled to
    [0, 1] on its own, in rows of 7 (the paper shows 28), with the variance share each explains."""
    k = len(components)
    cols = min(7, k)
    rows = math.ceil(k / cols)
    fig = new_figure(1.3 * cols + 0.4, 1.4 * rows + 0.8)
    for i, comp in enumerate(components):
        ax = fig.add_subplot(rows, cols, i + 1)
        img = _as_image(_unit_range(comp))
        ax.imshow(img, cmap="gray" if img.ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"{i + 1}: {100 * explained[i]:.1f}%", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title or "Principal components of the patch-embedding filters", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def similarity_mosaic(sim: np.ndarray) -> np.ndarray:
    """(gh, gw, gh, gw) -> one image of gh x gw small maps separated by one NaN (blank) pixel."""
    gh, gw = sim.shape[:2]
    out = np.full((gh * (gh + 1) - 1, gw * (gw + 1) - 1), np.nan)
    for r in range(gh):
        for c in range(gw):
            out[r * (gh + 1):r * (gh + 1) + gh, c * (gw + 1):c * (gw + 1) + gw] = sim[r, c]
    return out


def draw_position_similarity(path: Path, sim: np.ndarray, note: str = "", title: str = "") -> Path:
    """Fig. 7 centre: for each patch position (row, column), its position embedding's cosine similarity
    with every other position, as a grid of small maps."""
    gh, gw = sim.shape[:2]
    mosaic = similarity_mosaic(sim)
    side = min(12.0, max(4.5, 0.35 * max(gh, gw) + 3.5))
    lines = note.count("\n") + 1 if note else 0
    fig = new_figure(side + 1.0, side + 0.2 * lines)
    ax = fig.add_subplot()
    im = ax.imshow(mosaic, cmap="viridis", vmin=-1, vmax=1, interpolation="nearest")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="cosine similarity")
    step = max(1, math.ceil(max(gh, gw) / 14))
    cols, rows = range(0, gw, step), range(0, gh, step)
    ax.set_xticks([c * (gw + 1) + (gw - 1) / 2 for c in cols], labels=[str(c + 1) for c in cols])
    ax.set_yticks([r * (gh + 1) + (gh - 1) / 2 for r in rows], labels=[str(r + 1) for r in rows])
    ax.tick_params(length=0)
    ax.set_xlabel("input patch column")
    ax.set_ylabel("input patch row")
    ax.set_title(title or "Position embedding similarity", fontsize=10)
    if note:
        fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=8)
    fig.tight_layout(rect=(0, 0.035 * lines, 1, 1))
    return save_figure(fig, path)


def draw_attention_distance(path: Path, distance: np.ndarray, uniform: float | None = None,
                            image_side: float | None = None, title: str = "") -> Path:
    """Fig. 7 right: mean attention distance (pixels) of every head (one colour per head) against the
    block index; `uniform` draws the distance uniform attention would give as a dashed line."""
    depth, heads = distance.shape
    fig = new_figure(max(4.5, 0.25 * depth + 3.5), 4.0)
    ax = fig.add_subplot()
    layers = np.arange(1, depth + 1)
    cmap = _colormap("tab20" if heads > 10 else "tab10")
    for h in range(heads):
        ax.scatter(layers, distance[:, h], s=14, color=cmap(h % cmap.N), label=f"head {h + 1}")
    if uniform is not None:
        ax.axhline(uniform, color="gray", linestyle="--", linewidth=1, label="uniform attention")
    ax.set_xlabel("network depth (block)")
    ax.set_ylabel("mean attention distance (pixels)")
    top = max(float(distance.max()), uniform or 0.0)
    ax.set_ylim(0, (image_side if image_side and image_side >= top else top * 1.1) or 1.0)
    ax.set_xticks(layers if depth <= 16 else layers[::max(1, depth // 12)])
    if heads <= 16:
        ax.legend(fontsize=6, ncol=2 if heads > 6 else 1, loc="lower right")
    ax.set_title(title or "Mean attention distance per head", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, path)


def draw_per_class_accuracy(path: Path, accuracy: list[float | None], names: list[str], balanced: float,
                            title: str = "") -> Path:
    """One bar per class: its accuracy on the evaluation split, with the balanced accuracy (their mean) as a
    dashed line; classes without images are left empty."""
    n = len(accuracy)
    values = np.array([np.nan if a is None else a for a in accuracy], dtype=np.float64)
    fig = new_figure(max(4.5, 0.22 * n + 2.0), 3.6) if n <= 60 else new_figure(12.0, 3.6)
    ax = fig.add_subplot()
    ax.bar(np.arange(n), np.nan_to_num(values), color="tab:blue", width=0.8)
    ax.axhline(balanced, color="gray", linestyle="--", linewidth=1, label=f"balanced accuracy {100 * balanced:.1f}%")
    if n <= 60:
        ax.set_xticks(np.arange(n))
        ax.set_xticklabels([str(x)[:12] for x in names], rotation=90 if n > 12 else 0, fontsize=7)
    ax.set_xlabel("class")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title(title or "Per-class accuracy", fontsize=10)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, path)


def _colormap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def draw_rollout(path: Path, images: np.ndarray, maps: np.ndarray, captions: list[str] | None = None,
                 title: str = "") -> Path:
    """Fig. 6: each input image (n, H, W) or (n, H, W, 3) in [0, 1] above itself with its attention
    rollout map (n, gh, gw) laid over it (each map scaled by its own maximum)."""
    n = len(images)
    fig = new_figure(1.6 * n + 0.4, 3.7)
    h, w = images.shape[1:3]
    for i in range(n):
        img = images[i]
        cmap = "gray" if img.ndim == 2 else None
        top = fig.add_subplot(2, n, i + 1)
        top.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        bottom = fig.add_subplot(2, n, n + i + 1)
        bottom.imshow(img, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        peak = float(maps[i].max())
        m = maps[i] / peak if peak > 0 else np.zeros_like(maps[i])
        bottom.imshow(m, cmap="inferno", vmin=0, vmax=1, alpha=0.6, interpolation="bilinear",
                      extent=(-0.5, w - 0.5, h - 0.5, -0.5))
        for ax in (top, bottom):
            ax.set_xticks([])
            ax.set_yticks([])
        if captions:
            top.set_title(captions[i], fontsize=7)
    fig.text(0.01, 0.72, "input", rotation=90, fontsize=8, va="center")
    fig.text(0.01, 0.28, "attention", rotation=90, fontsize=8, va="center")
    fig.suptitle(title or "Attention rollout", fontsize=10)
    fig.tight_layout(rect=(0.02, 0, 1, 1))
    return save_figure(fig, path)


def draw_reconstruction(path: Path, originals: np.ndarray, masked: np.ndarray, reconstructed: np.ndarray,
                        title: str = "") -> Path:
    """MAE's Fig. 2: a column per image; rows original, masked (grey patches), reconstruction."""
    n = len(originals)
    fig = new_figure(1.6 * n + 0.4, 5.2)
    for row, (label, images) in enumerate((("original", originals), ("masked", masked), ("reconstruction", reconstructed))):
        for i in range(n):
            ax = fig.add_subplot(3, n, row * n + i + 1)
            ax.imshow(images[i], cmap="gray" if images[i].ndim == 2 else None, vmin=0, vmax=1, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title or "MAE reconstruction", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def draw_segmentation(path: Path, images: list[np.ndarray], truths: list[np.ndarray], predictions: list[np.ndarray],
                      colours: np.ndarray, captions: list[str], title: str = "") -> Path:
    """A row per image: the image, its ground-truth mask, the prediction (masks coloured by `colours`, a
    (256, 3) uint8 table; ignored pixels white)."""
    n = len(images)
    fig = new_figure(6.0, 2.0 * n + 0.5)
    for i in range(n):
        for col, (label, shown) in enumerate((("image", images[i]), ("ground truth", colours[truths[i]]),
                                             ("prediction", colours[predictions[i]]))):
            ax = fig.add_subplot(n, 3, 3 * i + col + 1)
            ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1 if shown.dtype != np.uint8 else 255,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=9)
            if col == 2:
                ax.set_xlabel(captions[i], fontsize=7)
    fig.suptitle(title or "segmentation", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def draw_pairs(path: Path, left: list[np.ndarray], right: list[np.ndarray], headings: tuple[str, str], captions: list[str],
               title: str = "") -> Path:
    """A row per image: two uint8 (H, W, 3) pictures side by side (e.g. annotated and detected objects)."""
    n = len(left)
    fig = new_figure(4.4, 2.2 * n + 0.5)
    for i in range(n):
        for col, shown in enumerate((left[i], right[i])):
            ax = fig.add_subplot(n, 2, 2 * i + col + 1)
            ax.imshow(shown, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(headings[col], fontsize=9)
            if col == 1:
                ax.set_xlabel(captions[i], fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
