"""`vit inspect` of a segmentation checkpoint: a grid of evaluation images, their ground-truth masks and the
checkpoint's predictions (as `vit eval` judges them: sliding windows, scores resized to the mask)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from vitcli.data.masks import IGNORE_INDEX, palette
from vitcli.data.seg_sources import load_mask_split
from vitcli.engine.seg_eval import checkpoint_transform
from vitcli.inspect.figures import draw_segmentation
from vitcli.models.seg_infer import segment
from vitcli.objectives.seg_metrics import ConfusionMatrix

FILE = "segmentation.png"


@torch.no_grad()
def segmentation_figure(model: torch.nn.Module, ck, dataset: str, split: str | None, data_dir: str | None, out: Path,
                        show: int, device: torch.device, name: str) -> dict[str, Any]:
    val = load_mask_split(dataset, split, role="eval", data_dir=data_dir, carve=False)
    window, tf = checkpoint_transform(model, ck)
    decode = val.target_decoder()
    rows = val.dataset.cast_column("mask", val.dataset.features["mask"].__class__(decode=False))
    model.to(device).eval()
    images, truths, predictions, captions = [], [], [], []
    names = ck.meta.class_names or [str(c) for c in range(model.num_classes)]
    for row in rows.select(range(min(show, len(rows)))):
        image = row["image"].convert("RGB")
        truth = decode(row["mask"])
        x, _ = tf(image, truth)
        scores = segment(model, x[None].to(device), model.num_classes, window, window).float()
        predicted = F.interpolate(scores, size=truth.shape, mode="bilinear", align_corners=False).argmax(1)[0].cpu()
        one = ConfusionMatrix(model.num_classes)
        one.update(predicted, torch.from_numpy(truth.astype(np.int64)))
        images.append(np.asarray(image))
        truths.append(truth)
        predictions.append(predicted.numpy().astype(np.uint8))
        present = [names[c] for c in np.unique(truth) if c != IGNORE_INDEX and c < len(names)]
        captions.append(f"mIoU {100 * one.results()['miou']:.0f}%: {', '.join(present[:4])}")
    colours = np.asarray(palette(), dtype=np.uint8).reshape(256, 3)
    path = draw_segmentation(out / FILE, images, truths, predictions, colours, captions,
                             f"{name} on {val.name} [{val.split}]: image, ground truth, prediction")
    return {"figures": {"segmentation": str(path)}, "dataset": val.name, "split": val.split, "num_images": len(images)}
