"""`vit eval` of a detection checkpoint: COCO box AP (ap, ap50, ap75, ap_small, ap_medium, ap_large) over the
evaluation split, each image as it is (the detector resizes it to its size and maps the boxes back)."""

from __future__ import annotations

from typing import Any, Callable

import torch

from vitcli.data import LoaderSpec, make_loader
from vitcli.data.det_sources import load_box_split
from vitcli.data.det_transforms import DetTransform, DetTransformSpec
from vitcli.engine.evalspec import EvalSpec
from vitcli.errors import VitError
from vitcli.models.config import input_channels
from vitcli.objectives.detection import evaluate_detection


def detection_eval(spec: EvalSpec, model: torch.nn.Module, ck, dataset: str, data_dir: str | None, dev: torch.device,
                   amp, say: Callable[[str], Any], progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    if spec.fewshot.shots or spec.knn or spec.linear_probe or spec.predictions or spec.confusion or spec.multi_scale:
        raise VitError("--fewshot, --knn, --linear-probe, --predictions, --confusion and --multi-scale are for classifiers "
                       "and segmenters; this checkpoint detects. Drop them (vit predict --json lists each image's boxes).")
    eval_set = load_box_split(dataset, spec.split, role="eval", data_dir=data_dir, subset=spec.subset, carve=False, say=say)
    if eval_set.num_classes + 1 != model.num_classes:
        raise VitError(f"the checkpoint detects {model.num_classes - 1} categories but {eval_set.name} has {eval_set.num_classes}. "
                       f"Fine-tune it on that set first (vit finetune --ckpt {ck.source} --task detection --dataset {eval_set.name}).")
    tf = DetTransform(DetTransformSpec(size=model.spec.size, channels=input_channels(model)), train=False)
    loader = make_loader(eval_set, tf, LoaderSpec.evaluation(spec.loader.batch_size, num_workers=spec.loader.num_workers,
                                                              bad_images=spec.loader.bad_images, pin_memory=dev.type == "cuda"),
                         device=dev)
    model.to(dev)
    seen = [0]

    def on_batch(images, found, targets) -> None:
        seen[0] += len(targets)
        if progress is not None:
            progress(seen[0], len(eval_set))

    metrics = evaluate_detection(model, loader, dev, amp, on_batch=on_batch)
    return {"checkpoint": str(ck.source), "model": ck.meta.model, "dataset": eval_set.name, "split": eval_set.split,
            "img_size": [model.spec.size, model.spec.size], "device": str(dev), "task": "detection", "top1": None,
            "detector": model.spec.kind, **metrics, "class_names": list(eval_set.class_names), "skipped_images": loader.skipped}
