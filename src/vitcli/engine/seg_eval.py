"""`vit eval` of a segmentation checkpoint: mIoU, pixel accuracy, mean accuracy and per-class IoU over the
evaluation split, with the sliding windows of the training crop (models/seg_infer.py) and, with
--multi-scale, Segmenter's scales 0.5-1.75 with flips."""

from __future__ import annotations

from typing import Any, Callable

import torch

from vitcli.data import LoaderSpec, make_loader
from vitcli.data.seg_sources import load_mask_split
from vitcli.data.seg_transforms import SegTransform, SegTransformSpec
from vitcli.engine.evalspec import EvalSpec
from vitcli.errors import VitError
from vitcli.models.seg_infer import MULTI_SCALES
from vitcli.objectives.segmentation import evaluate_segmentation


def window_of(model: torch.nn.Module) -> int:
    """The sliding window: the resolution the Segmenter's encoder is built for (its training crop)."""
    return min(model.encoder.patch_embed.img_size)


def checkpoint_transform(model: torch.nn.Module, ck) -> tuple[int, SegTransform]:
    """(window, evaluation transform) of a segmentation checkpoint: its window, its normalisation."""
    window = window_of(model)
    pre = ck.meta.preprocess
    mean, std = (tuple(pre.mean), tuple(pre.std)) if pre is not None else ((0.5,) * 3, (0.5,) * 3)
    return window, SegTransform(SegTransformSpec(crop_size=(window, window), mean=mean, std=std), train=False)


def segmentation_eval(spec: EvalSpec, model: torch.nn.Module, ck, dataset: str, data_dir: str | None, dev: torch.device,
                      amp, say: Callable[[str], Any], progress: Callable[[int, int], None] | None) -> dict[str, Any]:
    if spec.fewshot.shots or spec.knn or spec.linear_probe or spec.predictions or spec.confusion:
        raise VitError("--fewshot, --knn, --linear-probe, --predictions and --confusion are for classifiers; this checkpoint segments. Drop them "
                       "(vit predict --masks DIR writes each image's mask).")
    eval_set = load_mask_split(dataset, spec.split, role="eval", data_dir=data_dir, subset=spec.subset, carve=False, say=say)
    if eval_set.num_classes != model.num_classes:
        raise VitError(f"the checkpoint segments {model.num_classes} classes but {eval_set.name} has {eval_set.num_classes}. "
                       f"Fine-tune it on that set first (vit finetune --ckpt {ck.source} --task segmentation --dataset {eval_set.name}).")
    window, tf = checkpoint_transform(model, ck)
    stride = spec.window_stride or window
    loader = make_loader(eval_set, tf, LoaderSpec.evaluation(spec.loader.batch_size, num_workers=spec.loader.num_workers,
                                                              bad_images=spec.loader.bad_images, pin_memory=dev.type == "cuda"),
                         device=dev)
    model.to(dev)
    scales, flip = (MULTI_SCALES, True) if spec.multi_scale else ((1.0,), False)
    seen = [0]

    def on_batch(images, scores, masks) -> None:
        seen[0] += len(masks)
        if progress is not None:
            progress(seen[0], len(eval_set))

    metrics = evaluate_segmentation(model, loader, model.num_classes, dev, amp, window=window, stride=stride, scales=scales,
                                    flip=flip, on_batch=on_batch)
    return {"checkpoint": str(ck.source), "model": ck.meta.model, "dataset": eval_set.name, "split": eval_set.split,
            "img_size": [window, window], "device": str(dev), "task": "segmentation", "top1": None,
            "window": window, "window_stride": stride, "scales": list(scales), "flip": flip, **metrics,
            "class_names": list(eval_set.class_names), "skipped_images": loader.skipped}
