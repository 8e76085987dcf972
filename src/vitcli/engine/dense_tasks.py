"""The dense tasks (segmentation, detection): for each, the data a run reads (splits of masks or boxes with
joint transforms) and the task model it trains (an encoder under a decoder or a detector), and the model
fields that belong to that head rather than to the ViT. engine/setup.py picks them from DENSE_TASKS by the
recipe's task; classification is setup.py's own path."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from vitcli import data as vdata
from vitcli.data.det_sources import load_box_split
from vitcli.data.det_transforms import DetTransform, DetTransformSpec
from vitcli.data.masks import IGNORE_INDEX
from vitcli.data.seg_sources import load_mask_split
from vitcli.data.seg_transforms import SegTransform, SegTransformSpec
from vitcli.data.shard_index import is_shard_source
from vitcli.engine.rundata import RunData
from vitcli.errors import VitError
from vitcli.models.detector import Detector, DetectorSpec
from vitcli.models.segmenter import Segmenter, make_decoder
from vitcli.models.timm_classifier import is_timm_classifier, needs_vit
from vitcli.recipe import Recipe

DECODER_FIELDS = ("decoder", "decoder_layers", "decoder_dim", "decoder_heads", "decoder_dropout")  # the Segmenter's
DETECTOR_FIELDS = ("detector", "window_size", "global_blocks", "pyramid_channels", "pyramid_scales", "score_thresh",
                   "detections_per_img", "detector_args")  # the detector's
HEAD_FIELDS = DECODER_FIELDS + DETECTOR_FIELDS  # model fields that are not the ViT's


def _crop(recipe: Recipe, img_size: tuple[int, int]) -> tuple[int, int]:
    """The training crop: data.crop_size, else the model's resolution (which its position table is trained at)."""
    crop = recipe.data.crop_size if recipe.data.crop_size is not None else list(img_size)
    return (crop, crop) if isinstance(crop, int) else (int(crop[0]), int(crop[1]))


def _refuse_classification_settings(recipe: Recipe) -> None:
    d = recipe.data
    for key, bad in (("data.mixup / data.cutmix", d.mixup or d.cutmix), ("data.balance", d.balance != "none"),
                     ("data.holdout", d.holdout is not None), ("data.streaming", d.streaming),
                     ("data.imbalance", d.imbalance), ("data.repeated_augment", d.repeated_augment > 1),
                     ("objective.fewshot", recipe.objective.fewshot)):
        if bad:
            raise VitError(f"{key} is for classification; task: {recipe.task} does not use it. Drop it.")


def _encoder_of(model: torch.nn.Module) -> torch.nn.Module:
    """The ViT inside a task model (a Segmenter's or a Detector's encoder), or the model itself."""
    return model.encoder if isinstance(model, (Segmenter, Detector)) else model


def _streamed_train(recipe: Recipe, needs: str, written_as: str) -> vdata.ShardSet:
    """The training split of a dense task's tar shards, to stream (evaluation splits are read whole)."""
    d = recipe.data
    if d.train_subset:
        raise VitError("data.train_subset picks images of a map-style set; tar shards stream whole. Drop it.")
    train = vdata.stream_split(d.dataset, d.train_split, d.num_samples)
    if train.task != recipe.task:
        raise VitError(f"The shards at {d.dataset} hold {train.task} samples; task: {recipe.task} needs {needs}. Write the "
                       f"{recipe.task} set with `vit shards` ({written_as}).")
    if not train.num_samples and recipe.train.steps is None:
        raise VitError(f"The streamed set {train.name} comes without a sample count, so an epoch has no length. "
                       "Set data.num_samples=N or train.steps=N.")
    return train


def segmentation_data(recipe: Recipe, img_size: tuple[int, int], say=None) -> RunData:
    """A segmentation set's splits (data/seg_sources.py) with joint transforms, cropped to the training crop."""
    d, seed = recipe.data, recipe.train.seed
    _refuse_classification_settings(recipe)
    crop = _crop(recipe, img_size)
    if is_shard_source(d.dataset):  # images with KEY.seg.png masks: the training split streams
        train = _streamed_train(recipe, "masks", "each mask as KEY.seg.png")
    else:
        train = load_mask_split(d.dataset, d.train_split, role="train", data_dir=d.data_dir, subset=d.train_subset, seed=seed, say=say)
    evals = load_mask_split(d.dataset, d.eval_split, role="eval", data_dir=d.data_dir, subset=d.eval_subset, seed=0)
    spec = SegTransformSpec(crop_size=crop, resize_range=tuple(d.resize_range), hflip=d.hflip, photometric=d.photometric,
                            mean=tuple(d.mean), std=tuple(d.std))
    num_classes = recipe.model.num_classes or train.num_classes
    return RunData(name=train.name, train=train, eval=evals, num_classes=num_classes, class_names=list(train.class_names),
                   img_size=crop, train_transform=SegTransform(spec, train=True), eval_transform=SegTransform(spec, train=False),
                   mixup=None, criterion=torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX))


def detection_data(recipe: Recipe, img_size: tuple[int, int], say=None) -> RunData:
    """A detection set's splits (data/det_sources.py; tar shards: the training split streams) with joint box
    transforms: large-scale jitter into square training crops; evaluation images as they are (the detector
    resizes them)."""
    d, seed = recipe.data, recipe.train.seed
    _refuse_classification_settings(recipe)
    crop = _crop(recipe, img_size)
    if crop[0] != crop[1]:
        raise VitError(f"task: detection trains on square crops (large-scale jitter); data.crop_size {list(crop)} is not square.")
    if is_shard_source(d.dataset):  # images with KEY.json objects: the training split streams
        train = _streamed_train(recipe, "boxes", "each image's objects as KEY.json")
    else:
        train = load_box_split(d.dataset, d.train_split, role="train", data_dir=d.data_dir, subset=d.train_subset, seed=seed, say=say)
    evals = load_box_split(d.dataset, d.eval_split, role="eval", data_dir=d.data_dir, subset=d.eval_subset, seed=0)
    if recipe.model.detector == "mask_rcnn" and not (train.instance_masks and evals.instance_masks):
        raise VitError(f"model.detector mask_rcnn learns instance masks, and {train.name} has boxes only. Give a set whose "
                       "objects have masks (a COCO file with segmentation, or objects with segmentation), or pick a box "
                       "detector: --detector faster_rcnn.")
    spec = DetTransformSpec(size=crop[0], scale_range=tuple(d.resize_range), hflip=d.hflip, channels=len(d.mean))
    num_classes = (recipe.model.num_classes or train.num_classes) + 1  # torchvision's detectors: label 0 is the background
    return RunData(name=train.name, train=train, eval=evals, num_classes=num_classes, class_names=list(train.class_names),
                   img_size=crop, train_transform=DetTransform(spec, train=True), eval_transform=DetTransform(spec, train=False),
                   mixup=None, criterion=None)


def new_segmenter(model: torch.nn.Module, recipe: Recipe, num_classes: int, size: tuple[int, int]) -> Segmenter:
    """`model`'s encoder (a ViT, or a Segmenter's) under a new decoder of the recipe's kind."""
    cfg = recipe.model
    encoder = _encoder_of(model)
    if is_timm_classifier(getattr(encoder.config, "name", "")):
        raise needs_vit("task: segmentation (a decoder on the patch tokens)", encoder.config.name)
    encoder.reset_classifier(0)  # the class head has no use under a decoder
    settings = {} if cfg.decoder == "linear" else dict(dim=cfg.decoder_dim, layers=cfg.decoder_layers, heads=cfg.decoder_heads,
                                                       dropout=cfg.decoder_dropout)
    ref = next(encoder.parameters())
    decoder = make_decoder(cfg.decoder, encoder.embed_dim, num_classes, **settings).to(ref.device)
    return Segmenter(encoder, decoder, num_classes)


def new_detector(model: torch.nn.Module, recipe: Recipe, num_classes: int, size: tuple[int, int]) -> Detector:
    """`model`'s encoder (a ViT, or a task model's) under a new detector of the recipe's kind, its images
    resized to the training crop's side and normalised as the data says."""
    encoder = _encoder_of(model)
    if is_timm_classifier(getattr(encoder.config, "name", "")):
        raise needs_vit("task: detection (a feature pyramid on the patch tokens)", encoder.config.name)
    m, d = recipe.model, recipe.data
    spec = DetectorSpec(kind=m.detector, num_classes=num_classes, size=max(size), window_size=m.window_size,
                        global_blocks=tuple(m.global_blocks), channels=m.pyramid_channels, scale_factors=tuple(m.pyramid_scales),
                        mean=tuple(d.mean), std=tuple(d.std), score_thresh=m.score_thresh, detections_per_img=m.detections_per_img,
                        extra=dict(m.detector_args))
    return Detector(encoder, spec).to(next(encoder.parameters()).device)


class DenseTask(NamedTuple):
    data: Callable[..., RunData]  # (recipe, img_size, say) -> the run's data
    new_model: Callable[..., torch.nn.Module]  # (model, recipe, num_classes, crop) -> encoder under a new head
    model_class: type
    head_prefixes: tuple[str, ...]  # what a linear probe (frozen encoder) trains


DENSE_TASKS: dict[str, DenseTask] = {
    "segmentation": DenseTask(segmentation_data, new_segmenter, Segmenter, ("decoder.",)),
    "detection": DenseTask(detection_data, new_detector, Detector, ("detector.rpn.", "detector.roi_heads.", "detector.head.",
                                                                     "detector.backbone.pyramid.")),
}
