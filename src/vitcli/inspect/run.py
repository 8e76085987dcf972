"""`vit inspect`: the paper's inspection figures for any checkpoint.

    result = run_inspect("runs/quickstart")            # -> runs/quickstart/inspect/*.png + inspect.json
    print_inspect(result)

Steps: find the checkpoint (the newest run's best when none is given) -> build its model -> Fig. 7 left
(patch-embedding filters) and centre (position embeddings) from the weights alone -> when a data set is
known (--dataset, else the checkpoint's own), run up to `num_images` evaluation images through the model
with an AttentionProbe -> Fig. 7 right (mean attention distance) and Fig. 6 (attention rollout of the
first `show` images) -> inspect.json with the numbers behind every figure.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitcli import data as vdata
from vitcli.engine.resolve import load_for_inference, resolve_dataset
from vitcli.models.timm_classifier import is_timm_classifier, needs_vit
from vitcli.engine.runtime import pick_device
from vitcli.errors import VitError
from vitcli.io.paths import writable_dir, write_text
from vitcli.inspect import features as ft
from vitcli.inspect import figures as fg
from vitcli.inspect.reconstruct import load_mae, reconstructions
from vitcli.inspect.detection import detection_figure
from vitcli.inspect.segmentation import segmentation_figure
from vitcli.models import input_channels, input_size
from vitcli.objectives.evaluate import evaluate

FILES = {
    "filters": "fig7_left_patch_embedding_pca.png",
    "position": "fig7_centre_position_similarity.png",
    "distance": "fig7_right_attention_distance.png",
    "rollout": "fig6_attention_rollout.png",
    "per_class": "per_class_accuracy.png",
}
RECONSTRUCTION = "mae_fig2_reconstruction.png"  # MAE runs only
SUMMARY = "inspect.json"


def run_inspect(
    ckpt: str | Path | None,
    dataset: str | None = None,
    *,
    split: str | None = None,
    data_dir: str | None = None,
    out: Path | None = None,
    num_images: int = 128,
    show: int = 8,
    batch_size: int = 64,
    device: str = "auto",
    runs_root: Path = Path("runs"),
    say: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Draw the inspection figures of a checkpoint; return the numbers behind them and the files written.

    Args:
        ckpt: anything `load_checkpoint` accepts; None: the best checkpoint of the newest run under runs_root.
        dataset: images for the attention figures; None: the data set the checkpoint was trained on (the
            attention figures are skipped, with a note, when that is unknown).
        split: which split (default: the set's evaluation split).
        data_dir: a local copy of a named set.
        out: output folder; default RUN_DIR/inspect for a run's checkpoint, else ./inspect-<file stem>.
        num_images: images averaged over for the mean attention distance (a fixed seeded choice).
        show: images drawn with their attention rollout (the first of those chosen).
        batch_size: images per forward pass.
        device: auto, cpu or cuda (always fp32: the figures are about the weights, not speed).

    Returns:
        checkpoint, model, out, img_size, grid, figures {name: path}, notes, position {near, far,
        spearman, ...}, filters_explained, and with images: dataset, split, num_images,
        attention_distance (depth x heads, pixels), uniform_distance, rollout_patch_mass.
    """
    if num_images < 1:
        raise VitError(f"--images must be at least 1, got {num_images}")
    if show < 0:
        raise VitError(f"--show must be 0 or more, got {show}")
    batching = vdata.LoaderSpec.evaluation(batch_size, pin_memory=False)  # checks the batch size before any work
    model, ck, run_dir = load_for_inference(ckpt, Path(runs_root), say)
    if is_timm_classifier(ck.meta.model):
        raise needs_vit("vit inspect (position embeddings, attention maps, patch filters)", ck.meta.model)
    out = writable_dir(Path(out) if out is not None else _default_out(ck.source, run_dir), "--out")
    name = run_dir.name if run_dir is not None else Path(str(ck.source)).name
    dense = model if ck.meta.task in ("segmentation", "detection") else None
    if dense is not None:  # the encoder's figures, then images with their masks or objects instead of attention
        model = dense.encoder
    grid = tuple(model.patch_embed.grid_size)
    result: dict[str, Any] = {
        "checkpoint": str(ck.source), "model": ck.meta.model, "out": str(out),
        "img_size": list(input_size(model)), "grid": list(grid), "figures": {}, "notes": [],
    }

    # Fig. 7 left: the patch-embedding filters.
    if ft.has_pixel_filters(model):
        comps, explained = ft.patch_embedding_pca(model)
        result["filters_explained"] = explained.tolist()
        result["figures"]["filters"] = str(fg.draw_filters(
            out / FILES["filters"], comps, explained,
            f"{name}: principal components of the patch-embedding filters"))
    else:
        result["notes"].append("no filter figure: this model's patch embedding projects CNN features, not pixels")

    # Fig. 7 centre: the position embeddings.
    if getattr(model, "pos_embed", None) is not None:
        sim = ft.position_similarity(model)
        stats = ft.position_structure(sim)
        result["position"] = stats.as_dict()
        result["figures"]["position"] = str(fg.draw_position_similarity(
            out / FILES["position"], sim, position_note(stats, "\n"), f"{name}: position embedding similarity"))
    else:
        result["notes"].append("no position figure: this model has no learned position table (rotary embeddings only)")

    # Fig. 7 right and Fig. 6: attention on real images.
    if dataset is None and not ck.meta.dataset:
        result["notes"].append("no attention figures: the checkpoint does not say which data set it was trained "
                               "on; pass --dataset to draw them")
    elif dense is not None:
        dataset, data_dir = resolve_dataset(dataset, data_dir, ck, run_dir)
        figure = segmentation_figure if ck.meta.task == "segmentation" else detection_figure
        drawn = figure(dense, ck, dataset, split, data_dir, out, max(show, 1), pick_device(device), name)
        result["figures"].update(drawn.pop("figures"))
        result.update(drawn)
    else:
        dataset, data_dir = resolve_dataset(dataset, data_dir, ck, run_dir)
        mae = load_mae(ck, run_dir, model)
        result.update(_attention_figures(model, ck, dataset, split, data_dir, out, num_images, show, batching,
                                         pick_device(device), name, mae))
        result["figures"].update(result.pop("_figures"))
        result.update(_per_class_figure(model, ck, dataset, split, data_dir, out, batching, pick_device(device), name))
        result["figures"].update(result.pop("_figures"))

    write_text(out / SUMMARY, json.dumps(result, indent=1, default=_plain) + "\n", "--out")
    result["summary"] = str(out / SUMMARY)
    return result


def position_note(stats: ft.PositionStructure, sep: str = "; ") -> str:
    def f(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    return (f"mean cosine similarity of grid neighbours {f(stats.near)}, of positions >= {stats.far_from:g} apart "
            f"{f(stats.far)}{sep}same row {f(stats.same_row)}, same column {f(stats.same_column)}, neither "
            f"{f(stats.other)}{sep}Spearman rho(grid distance, similarity) {stats.spearman:.3f} over {stats.n_pairs} pairs")


def _default_out(source: Path | str, run_dir: Path | None) -> Path:
    if run_dir is not None:
        return run_dir / "inspect"
    stem = Path(str(source)).name.split(".")[0] or "checkpoint"
    return Path(f"inspect-{stem.replace(':', '_')}")


def _plain(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x).__name__)


@torch.no_grad()
def _attention_figures(model, ck, dataset: str, split, data_dir, out: Path, num_images: int, show: int,
                       batching: vdata.LoaderSpec, dev: torch.device, name: str, mae=None) -> dict[str, Any]:
    img_size = input_size(model)
    images = vdata.load_split(dataset, split, role="eval", data_dir=data_dir, img_size=img_size, seed=0,
                              subset=num_images)
    cfg = vdata.TransformSpec.from_checkpoint(ck.meta, input_channels(model))
    tf = vdata.build_transform(cfg, img_size, train=False)
    loader = vdata.make_loader(images, tf, batching)
    model.to(dev)
    probe = ft.AttentionProbe(model, rollout_images=show)
    shown: list[torch.Tensor] = []
    labels: list[int] = []
    preds: list[int] = []
    with probe:
        for x, y in loader:
            logits = model(x.to(dev))
            if len(shown) < show:
                take = show - len(shown)
                shown.extend(x[:take])
                labels.extend(y[:take].tolist())
                preds.extend(logits[:take].argmax(dim=-1).tolist() if logits.ndim == 2 and logits.shape[1] else [])
    model.to("cpu")
    dist = probe.mean_distance()
    uniform = ft.mean_pairwise_distance(probe.grid, ft.patch_cell(model))
    figures = {"distance": str(fg.draw_attention_distance(
        out / FILES["distance"], dist, uniform, float(max(img_size)),
        f"{name}: mean attention distance ({len(images)} {images.name} images)"))}
    result: dict[str, Any] = {"dataset": images.name, "split": images.split, "num_images": len(images),
                              "attention_distance": dist.tolist(), "uniform_distance": uniform}
    if show:
        maps = probe.rollout_maps()
        pictures = _denormalise(torch.stack(shown), cfg.mean, cfg.std)
        names = images.class_names
        head_fits = model.num_classes == images.num_classes and len(preds) == len(labels)
        captions = [f"{names[t]}" + (f" (pred {names[p]})" if head_fits else "")
                    for t, p in zip(labels, preds if head_fits else labels)]
        figures["rollout"] = str(fg.draw_rollout(out / FILES["rollout"], pictures, maps, captions,
                                                 f"{name}: attention rollout"))
        result["rollout_patch_mass"] = maps.reshape(len(maps), -1).sum(axis=1).tolist()
        if mae is not None:  # an MAE run: its decoder fills in 75% masked patches (MAE's Fig. 2)
            originals, masked, rebuilt = reconstructions(mae, torch.stack(shown), cfg.mean, cfg.std)
            figures["reconstruction"] = str(fg.draw_reconstruction(
                out / RECONSTRUCTION, originals, masked, rebuilt,
                f"{name}: MAE reconstruction at mask ratio {mae.mask_ratio:g}"))
    result["_figures"] = figures
    return result


def _per_class_figure(model, ck, dataset: str, split, data_dir, out: Path, batching: vdata.LoaderSpec,
                      dev: torch.device, name: str) -> dict[str, Any]:
    """Per-class accuracy over the whole evaluation split (the classifier's head on its own classes only)."""
    img_size = input_size(model)
    images = vdata.load_split(dataset, split, role="eval", data_dir=data_dir, img_size=img_size, seed=0)
    if not model.num_classes or model.num_classes != images.num_classes:
        return {"_figures": {}}
    tf = vdata.build_transform(vdata.TransformSpec.from_checkpoint(ck.meta, input_channels(model)), img_size, train=False)
    scores = evaluate(model, vdata.make_loader(images, tf, batching), images.num_classes, dev)
    model.to("cpu")
    per_class = [None if a != a else a for a in scores["per_class_accuracy"]]
    title = f"{name}: per-class accuracy on {images.name} [{images.split}] ({len(images)} images)"
    path = fg.draw_per_class_accuracy(out / FILES["per_class"], per_class, images.class_names,
                                      scores["balanced_accuracy"], title)
    return {"per_class_accuracy": per_class, "balanced_accuracy": scores["balanced_accuracy"], "top1": scores["top1"],
            "_figures": {"per_class": str(path)}}


def _denormalise(x: torch.Tensor, mean, std) -> np.ndarray:
    """(n, C, H, W) normalised -> (n, H, W) or (n, H, W, 3) in [0, 1] for drawing."""
    m = torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    img = (x * s + m).clamp(0, 1).numpy()
    return img[:, 0] if img.shape[1] != 3 else np.moveaxis(img, 1, -1)


def print_inspect(result: dict[str, Any], console=None) -> None:
    """Where each figure went, and the headline numbers."""
    from rich.console import Console
    from rich.markup import escape

    console = console or Console()
    titles = {"filters": "Fig. 7 left, patch-embedding filters (PCA)", "position": "Fig. 7 centre, position embeddings",
              "distance": "Fig. 7 right, mean attention distance", "rollout": "Fig. 6, attention rollout",
              "reconstruction": "MAE Fig. 2, reconstruction", "per_class": "per-class accuracy",
              "segmentation": "segmentation: image, ground truth, prediction", "detection": "detection: annotated and detected objects"}
    for key, title in titles.items():
        if key in result["figures"]:
            console.print(f"{title}: {escape(result['figures'][key])}", highlight=False, soft_wrap=True)
    pos = result["position"]
    console.print(f"position embeddings ({result['grid'][0]}x{result['grid'][1]} grid): "
                  + escape(position_note(ft.PositionStructure(**pos))), highlight=False, soft_wrap=True)
    if "attention_distance" in result:
        d = np.asarray(result["attention_distance"])
        console.print(f"mean attention distance over {result['num_images']} images: block 1 {d[0].mean():.2f} px, "
                      f"block {len(d)} {d[-1].mean():.2f} px (uniform attention: {result['uniform_distance']:.2f} px)",
                      highlight=False, soft_wrap=True)
    for note in result["notes"]:
        console.print(f"[dim]{escape(note)}[/]")
    console.print(f"numbers: {escape(result['summary'])}", highlight=False, soft_wrap=True)
