"""Find the images, build the checkpoint's model and eval transform, and yield top-k predictions."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import torch
from PIL import Image

from vitcli import data as vdata
from vitcli.engine.resolve import load_for_inference
from vitcli.engine.runtime import autocast_dtype, pick_device
from vitcli.errors import VitError
from vitcli.models import input_channels, input_size

PARTIAL_EXIT_CODE = 4  # predictions written for the readable images; some could not be read (named on stderr)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class Prediction:
    path: str
    top: list[tuple[str, int, float]]  # (label, class index, probability), most probable first


@dataclass
class Predictions:
    """What `predict` found out beyond the rows: the checkpoint, the class names, the unreadable images."""

    checkpoint: str = ""
    img_size: tuple[int, int] = (0, 0)
    total: int = 0
    skipped: list[str] = field(default_factory=list)  # the unreadable images' paths
    reasons: list[str] = field(default_factory=list)  # why, for the first few


def find_images(inputs: list[str]) -> list[Path]:
    """Image files named by paths, folders (searched recursively) and globs, in a stable order."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found.append(path)
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(item), recursive=True) if Path(p).is_file())
            if not matches:
                raise VitError(f"no file matches {item!r}. Check the pattern (quote it so the shell does not expand it).")
            found += matches
        else:
            raise VitError(f"{item} does not exist. Pass image files, folders of images or globs such as 'photos/*.jpg'.")
    if not found:
        raise VitError(f"no images found in {', '.join(inputs)} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}).")
    return found


def readable_images(paths: list[Path], info: Predictions) -> Iterator[tuple[int, Path, Image.Image]]:
    """(position, path, RGB image) for each image PIL reads; the others are named in `info` and skipped."""
    for i, path in enumerate(paths):
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except Exception as e:  # noqa: BLE001 -- any decoder failure: skip and name it
            info.skipped.append(str(path))
            info.reasons.append(f"{path}: {type(e).__name__}: {e}")
            continue
        yield i, path, image


def predict(ckpt: str | Path | None, inputs: list[str], *, topk: int = 5, batch_size: int = 64, device: str = "auto",
            num_workers: int = 0, reduced_decode: bool = True, runs_root: Path = Path("runs"), info: Predictions | None = None,
            progress: Callable[[int, int], Any] | None = None, say: Callable[[str], Any] = print,
            score_thresh: float = 0.5, draw: Path | None = None) -> Iterator[Prediction]:
    """Yield one Prediction per readable image, batch by batch; `info` (when given) is filled in as it goes.
    A detection checkpoint yields BoxPredictions instead (predict/boxes.py: boxes scoring at least
    `score_thresh`, drawn into `draw` when given)."""
    if topk < 1:
        raise VitError(f"--topk must be at least 1, got {topk}")
    batching = vdata.LoaderSpec.evaluation(batch_size, num_workers=num_workers, bad_images="skip")  # checked before any work
    info = info if info is not None else Predictions()
    paths = find_images(inputs)
    model, ck, _ = load_for_inference(ckpt, Path(runs_root), say, needs_head="it cannot predict classes")
    if ck.meta.task == "segmentation":
        raise VitError(f"{ck.source} segments images: pass --masks DIR to write each image's mask (and --overlay to see it).")
    if draw is not None and ck.meta.task != "detection":
        raise VitError(f"--draw draws a detector's boxes; {ck.source} classifies. Drop --draw.")
    if ck.meta.task == "detection":
        from vitcli.predict.boxes import detect_images

        dev = pick_device(device)
        info.checkpoint, info.img_size, info.total = str(ck.source), (model.spec.size, model.spec.size), len(paths)
        yield from detect_images(model, ck, paths, score_thresh=score_thresh, draw=draw, dev=dev, amp=autocast_dtype("auto", dev),
                                 info=info, progress=progress)
        return
    names = ck.meta.class_names or [str(i) for i in range(model.num_classes)]
    dev = pick_device(device)
    amp = autocast_dtype("auto", dev)
    size = input_size(model)
    info.checkpoint, info.img_size, info.total = str(ck.source), size, len(paths)
    # the label column carries each image's position, so rows map back to paths after skips
    files = datasets.Dataset.from_dict({"image": [str(p) for p in paths], "label": list(range(len(paths)))})
    files = files.cast_column("image", datasets.Image())
    image_set = vdata.ImageSet(files, len(paths), [p.name for p in paths], "images", "predict")
    spec = vdata.TransformSpec.from_checkpoint(ck.meta, input_channels(model), reduced_decode=reduced_decode)
    tf = vdata.build_transform(spec, size, train=False)
    loader = vdata.make_loader(image_set, tf, replace(batching, pin_memory=dev.type == "cuda"), device=dev)
    model.to(dev).eval()
    k = min(topk, model.num_classes)
    # a multi-label head: a sigmoid per class, every class over the threshold its run chose on held-out images
    threshold = float(ck.meta.training.get("threshold") or 0.5) if ck.meta.task == "multilabel" else None
    if threshold is not None:
        say(f"multi-label: each image's classes with probability >= {threshold:.2f} (the checkpoint's threshold), "
            f"at most {k} (--topk)")
    predicted: set[int] = set()
    with torch.no_grad():
        for images, positions in loader:
            with torch.autocast(dev.type, dtype=amp) if amp else nullcontext():
                logits = model(images)
            if threshold is None:
                probs, classes = logits.float().softmax(dim=1).topk(k, dim=1)
            else:
                probs, classes = logits.float().sigmoid().topk(k, dim=1)
            for pos, p, c in zip(positions.tolist(), probs.tolist(), classes.tolist()):
                predicted.add(pos)
                kept = [(names[i], i, q) for i, q in zip(c, p) if threshold is None or q >= threshold]
                yield Prediction(str(paths[pos]), kept)
            if progress is not None:
                progress(len(predicted) + loader.skipped, len(paths))
    info.skipped = [str(p) for i, p in enumerate(paths) if i not in predicted]
    info.reasons = list(loader.skipped_examples)
