"""`vit predict` with a detection checkpoint: each image's boxes, categories and scores (those at least
--score-thresh), in the image's own pixels (x0, y0, x1, y1), and from a Mask R-CNN each object's mask (its
probability cut at 0.5) as COCO compressed RLE, {size: [H, W], counts}, as COCO's results and detectron2's
JSON hold them (pycocotools.mask.decode reads it); with --draw DIR, a copy of each image with its boxes (and
masks) drawn (torchvision.utils.draw_bounding_boxes, draw_segmentation_masks).

Each image is read whole and given to the detector as it is: the detector resizes it (its longer side to
the checkpoint's size, as `vit eval` does) and maps the boxes back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from vitcli.data.box_pictures import draw_objects
from vitcli.data.det_transforms import DetTransform, DetTransformSpec
from vitcli.data.instance_masks import encode_masks
from vitcli.errors import VitError
from vitcli.io.paths import writable_dir
from vitcli.models.config import input_channels
from vitcli.predict.masks import unique_stem
from vitcli.predict.run import readable_images


@dataclass
class BoxPrediction:
    path: str
    objects: list[dict[str, Any]]  # {label, index, score, box: [x0, y0, x1, y1], mask?: RLE}, most confident first
    drawn: str | None = None


def detect_images(model: torch.nn.Module, ck, paths: list[Path], *, score_thresh: float, draw: Path | None, dev: torch.device,
                  amp, info, progress: Callable[[int, int], Any] | None) -> Iterator[BoxPrediction]:
    """One BoxPrediction per readable image; unreadable ones are listed in `info.skipped`."""
    if not 0.0 <= score_thresh < 1.0:
        raise VitError(f"--score-thresh must be in [0, 1); got {score_thresh}.")
    out_dir = writable_dir(draw, "--draw") if draw is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    names = ck.meta.class_names or [str(i) for i in range(model.num_classes - 1)]
    tf = DetTransform(DetTransformSpec(size=model.spec.size, channels=input_channels(model)), train=False)
    model.to(dev).eval()
    used: set[str] = set()
    for i, path, image in readable_images(paths, info):
        x, _ = tf(image, {})
        with torch.no_grad(), (torch.autocast(dev.type, dtype=amp) if amp else nullcontext()):
            found = model([x.to(dev)])[0]
        keep = found["scores"].float() >= score_thresh
        boxes, scores, labels = found["boxes"][keep].float().cpu(), found["scores"][keep].float().cpu(), found["labels"][keep].cpu()
        objects = [{"label": names[c - 1], "index": c - 1, "score": round(s, 6), "box": [round(v, 2) for v in b]}
                   for b, s, c in zip(boxes.tolist(), scores.tolist(), labels.tolist())]
        masks = (found["masks"][keep][:, 0] > 0.5).cpu() if "masks" in found else None
        if masks is not None:
            for o, rle in zip(objects, encode_masks(masks)):
                o["mask"] = rle
        drawn = None
        if out_dir is not None:
            pixels = pil_to_tensor(image)
            picture = draw_objects(pixels, boxes, labels, [f"{o['label']} {o['score']:.2f}" for o in objects], masks)
            drawn = str(out_dir / f"{unique_stem(path.stem, used)}.png")
            Image.fromarray(picture.permute(1, 2, 0).numpy()).save(drawn)
        if progress is not None:
            progress(i + 1, len(paths))
        yield BoxPrediction(str(path), objects, drawn)
