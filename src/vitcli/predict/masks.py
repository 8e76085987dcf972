"""`vit predict --masks DIR`: segment images with a segmentation checkpoint, one palette PNG mask per image
(its pixel values are class ids, its palette colours them), optionally an overlay of the colours on the
image, and each image's class areas (fractions of its pixels).

Each image is read at its own size, its shorter side resized to the checkpoint's window (as `vit eval`
sees it), slid over, and the class scores resized back (bilinear) before the argmax: the mask has the
image's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vitcli.data.masks import palette
from vitcli.engine.resolve import load_for_inference
from vitcli.engine.runtime import autocast_dtype, pick_device
from vitcli.engine.seg_eval import checkpoint_transform
from vitcli.errors import VitError
from vitcli.io.paths import writable_dir
from vitcli.models.seg_infer import segment
from vitcli.predict.run import Predictions, find_images, readable_images

OVERLAY_ALPHA = 0.5


@dataclass
class MaskPrediction:
    path: str
    mask: str  # the palette PNG written
    areas: dict[str, float]  # class name -> fraction of the image's pixels, largest first
    overlay: str | None = None


def predict_masks(ckpt: str | Path | None, inputs: list[str], out_dir: Path, *, overlay: bool = False, device: str = "auto",
                  runs_root: Path = Path("runs"), info: Predictions | None = None,
                  progress: Callable[[int, int], Any] | None = None, say: Callable[[str], Any] = print) -> Iterator[MaskPrediction]:
    """Yield one MaskPrediction per readable image; unreadable ones are listed in `info.skipped`."""
    paths = find_images(inputs)
    out_dir = writable_dir(out_dir, "--masks")
    info = info if info is not None else Predictions()
    model, ck, _ = load_for_inference(ckpt, Path(runs_root), say)
    if ck.meta.task != "segmentation":
        raise VitError(f"--masks needs a segmentation checkpoint; {ck.source} classifies. Drop --masks, or fine-tune it "
                       "with --task segmentation first.")
    names = ck.meta.class_names or [str(i) for i in range(model.num_classes)]
    dev = pick_device(device)
    amp = autocast_dtype("auto", dev)
    window, tf = checkpoint_transform(model, ck)
    colours = palette()
    model.to(dev).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    info.checkpoint, info.img_size, info.total = str(ck.source), (window, window), len(paths)
    used: set[str] = set()
    for i, path, image in readable_images(paths, info):
        x, _ = tf(image, np.zeros((image.height, image.width), dtype=np.uint8))
        with torch.no_grad(), (torch.autocast(dev.type, dtype=amp) if amp else nullcontext()):
            scores = segment(model, x[None].to(dev), model.num_classes, window, window).float()
        scores = F.interpolate(scores, size=(image.height, image.width), mode="bilinear", align_corners=False)
        mask = scores.argmax(1)[0].to(torch.uint8).cpu().numpy()
        stem = unique_stem(path.stem, used)
        written = Image.fromarray(mask, mode="P")
        written.putpalette(colours)
        mask_path = out_dir / f"{stem}.png"
        written.save(mask_path)
        blend = None
        if overlay:
            blend = out_dir / f"{stem}_overlay.png"
            Image.blend(image, written.convert("RGB"), OVERLAY_ALPHA).save(blend)
        counts = np.bincount(mask.ravel(), minlength=model.num_classes) / mask.size
        areas = {names[c]: round(float(counts[c]), 6) for c in np.argsort(-counts) if counts[c] > 0}
        if progress is not None:
            progress(i + 1, len(paths))
        yield MaskPrediction(str(path), str(mask_path), areas, str(blend) if blend else None)


def unique_stem(stem: str, used: set[str]) -> str:
    """The image's stem, numbered when another image of the same stem was written already."""
    name, n = stem, 1
    while name in used:
        n += 1
        name = f"{stem}-{n}"
    used.add(name)
    return name
