"""`vit inspect` of a detection checkpoint: evaluation images with their annotated objects (boxes, and masks
where the set has them) beside the checkpoint's detections scoring at least 0.5 (as `vit predict --draw`
draws them), each image as `vit eval` gives it to the detector."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vitcli.data.box_pictures import draw_objects
from vitcli.data.boxes import decode_objects
from vitcli.data.det_sources import load_box_split
from vitcli.data.det_transforms import DetTransform, DetTransformSpec
from vitcli.inspect.figures import draw_pairs
from vitcli.models.config import input_channels

FILE = "detection.png"
SCORE = 0.5  # detections drawn: those at least this confident (vit predict's default --score-thresh)


@torch.no_grad()
def detection_figure(model: torch.nn.Module, ck, dataset: str, split: str | None, data_dir: str | None, out: Path,
                     show: int, device: torch.device, name: str) -> dict[str, Any]:
    val = load_box_split(dataset, split, role="eval", data_dir=data_dir, carve=False)
    tf = DetTransform(DetTransformSpec(size=model.spec.size, channels=input_channels(model)), train=False)
    names = ck.meta.class_names or [str(c) for c in range(model.num_classes - 1)]
    model.to(device).eval()
    truths, found, captions = [], [], []
    for row in val.dataset.select(range(min(show, len(val)))):
        x, target = tf(row["image"], decode_objects(row["objects"]))
        pixels = x.mul(255).round().to(torch.uint8)
        truths.append(draw_objects(pixels, target["boxes"], target["labels"], [names[c - 1] for c in target["labels"].tolist()],
                                   target.get("masks")))
        detected = {k: v.cpu() for k, v in model([x.to(device)])[0].items()}
        keep = detected["scores"] >= SCORE
        labels = detected["labels"][keep]
        masks = detected["masks"][keep][:, 0] > 0.5 if "masks" in detected else None
        found.append(draw_objects(pixels, detected["boxes"][keep], labels,
                                  [f"{names[c - 1]} {s:.2f}" for c, s in zip(labels.tolist(), detected["scores"][keep].tolist())],
                                  masks))
        captions.append(f"{len(target['labels'])} annotated, {int(keep.sum())} detected at >= {SCORE}")
    path = draw_pairs(out / FILE, [t.permute(1, 2, 0).numpy() for t in truths], [f.permute(1, 2, 0).numpy() for f in found],
                      ("annotated", f"detected (score >= {SCORE})"), captions,
                      f"{name} on {val.name} [{val.split}]: objects and detections")
    return {"figures": {"detection": str(path)}, "dataset": val.name, "split": val.split, "num_images": len(truths)}
