"""Object detection with a plain ViT: ViTDet's backbone (models/detection_backbone.py) under one of
torchvision's own detectors, with their anchor generators, RoI heads, losses and post-processing:

- `faster_rcnn`: FasterRCNN (RPN + RoIAlign box head), anchors 8x each level's stride (32-512 px for
  16-px patches, torchvision's and ViTDet's), aspect ratios 0.5 / 1 / 2;
- `retinanet`: RetinaNet, anchors 4x the stride at three octave scales (torchvision's);
- `fcos`: FCOS, one anchor point per location, sized as the stride (torchvision's);
- `mask_rcnn`: MaskRCNN, Faster R-CNN's anchors and box head plus its mask head (RoIAlign 14 x 14, four 3 x 3
  convolutions as wide as the pyramid, torchvision's 256 at 256 channels -> 28 x 28 masks), ViTDet's main
  detector; it needs objects with instance masks.

Images go in as a list of float (C, H, W) tensors in [0, 1] of any sizes; the detector's transform resizes
each so its longer side is `size` (torchvision's min_size = max_size), normalises it with the encoder's
mean and std, pads the batch to a multiple of the coarsest stride, and maps the boxes it finds back to the
image as given. Labels are 1..K (0: background), so a detector for K categories has K + 1 classes.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from vitcli.errors import VitError
from vitcli.models.detection_backbone import ViTDetBackbone
from vitcli.models.intermediates import patch_stride
from vitcli.models.pyramid import SCALE_FACTORS

DETECTORS = ("faster_rcnn", "retinanet", "fcos", "mask_rcnn")
DetectorKind = Literal["faster_rcnn", "retinanet", "fcos", "mask_rcnn"]
CLASSES = {"faster_rcnn": FasterRCNN, "retinanet": RetinaNet, "fcos": FCOS, "mask_rcnn": MaskRCNN}


@dataclass(frozen=True)
class DetectorSpec:
    """What builds a detector (a checkpoint's `detector` settings hold the same)."""

    kind: DetectorKind = "faster_rcnn"
    num_classes: int = 91  # categories + 1 for the background (COCO: 80 categories under 90 ids + 1, as torchvision)
    size: int = 1024  # the longer side images are resized to
    window_size: int = 0
    global_blocks: tuple[int, ...] = ()
    channels: int = 256
    scale_factors: tuple[float, ...] = SCALE_FACTORS
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    score_thresh: float = 0.05
    detections_per_img: int = 100
    # more keyword arguments of the torchvision class (e.g. rpn_post_nms_top_n_train, box_batch_size_per_image)
    extra: dict = field(default_factory=dict)

    def settings(self) -> dict:
        return {"kind": self.kind, "size": self.size, "window_size": self.window_size, "global_blocks": list(self.global_blocks),
                "channels": self.channels, "scale_factors": list(self.scale_factors), "score_thresh": self.score_thresh,
                "detections_per_img": self.detections_per_img, "args": dict(self.extra)}


def level_strides(encoder: nn.Module, scale_factors: Sequence[float]) -> list[float]:
    """The pixel stride of each pyramid level, the extra pooled level last."""
    stride = patch_stride(encoder)[0]
    strides = [stride / s for s in scale_factors]
    return strides + [strides[-1] * 2]


class Detector(nn.Module):
    """A torchvision detector on a vitcli encoder: forward(images, targets) -> losses (training) or
    detections (eval), as torchvision's; `encoder`, `blocks`, layer-decay groups and settings for the engine."""

    def __init__(self, encoder: nn.Module, spec: DetectorSpec):
        super().__init__()
        if spec.kind not in DETECTORS:
            raise VitError(f"model.detector must be one of {', '.join(DETECTORS)}; got {spec.kind!r}.")
        if spec.kind == "fcos" and spec.channels % 32:
            raise VitError(f"FCOS's head normalises in 32 groups: model.pyramid_channels must be a multiple of 32; got {spec.channels}.")
        _freeze_classifier_parts(encoder)
        backbone = ViTDetBackbone(encoder, window_size=spec.window_size, global_blocks=spec.global_blocks,
                                  out_channels=spec.channels, scale_factors=spec.scale_factors)
        strides = level_strides(encoder, spec.scale_factors)
        names = [*(str(i) for i in range(len(spec.scale_factors))), "pool"]
        # padded so the coarsest level (pooled twice below the patch grid) divides evenly: 64 px for 16-px patches
        divisible = int(round(patch_stride(encoder)[0] * 2 / min(spec.scale_factors)))
        common = dict(min_size=spec.size, max_size=spec.size, image_mean=list(spec.mean), image_std=list(spec.std),
                      size_divisible=divisible)
        common.update(_checked_args(spec.kind, spec.extra))
        levels = len(strides)
        if spec.kind in ("faster_rcnn", "mask_rcnn"):
            anchors = AnchorGenerator(tuple((8 * s,) for s in strides), ((0.5, 1.0, 2.0),) * levels)
            pool = MultiScaleRoIAlign(featmap_names=names[:-1], output_size=7, sampling_ratio=2)
            if spec.kind == "mask_rcnn":
                common["mask_roi_pool"] = MultiScaleRoIAlign(featmap_names=names[:-1], output_size=14, sampling_ratio=2)
            self.detector = CLASSES[spec.kind](backbone, spec.num_classes, rpn_anchor_generator=anchors, box_roi_pool=pool,
                                               box_score_thresh=spec.score_thresh, box_detections_per_img=spec.detections_per_img,
                                               **common)
            if spec.kind == "mask_rcnn":  # set after: torchvision takes num_classes or a mask predictor, not both
                heads = self.detector.roi_heads
                heads.mask_head = MaskRCNNHeads(spec.channels, (spec.channels,) * 4, dilation=1)
                heads.mask_predictor = MaskRCNNPredictor(spec.channels, spec.channels, spec.num_classes)
        elif spec.kind == "retinanet":
            anchors = AnchorGenerator(tuple(tuple(4 * s * 2 ** (k / 3) for k in range(3)) for s in strides), ((0.5, 1.0, 2.0),) * levels)
            self.detector = RetinaNet(backbone, spec.num_classes, anchor_generator=anchors, score_thresh=spec.score_thresh,
                                      detections_per_img=spec.detections_per_img, **common)
        else:
            anchors = AnchorGenerator(tuple((s,) for s in strides), ((1.0,),) * levels)
            self.detector = FCOS(backbone, spec.num_classes, anchor_generator=anchors, score_thresh=spec.score_thresh,
                                 detections_per_img=spec.detections_per_img, **common)
        self.spec = spec
        self.num_classes = spec.num_classes

    @property
    def encoder(self) -> nn.Module:
        return self.detector.backbone.encoder

    @property
    def config(self):
        """The encoder's (a registered ViT's) config: what the checkpoint's model / model_args describe."""
        return self.encoder.config

    @property
    def blocks(self) -> nn.Module:
        """The encoder's blocks: what activation checkpointing and FSDP wrap one by one."""
        return self.encoder.blocks

    @property
    def masks(self) -> bool:
        """Whether it predicts instance masks (and needs them to train)."""
        return self.spec.kind == "mask_rcnn"

    def forward(self, images: list[torch.Tensor], targets: list[dict] | None = None):
        out = self.detector(images, targets)
        if self.training:
            return out
        # RetinaNet and FCOS score label 0 like any class (it is never a target, so it fades as they train):
        # it is the background, never a detection
        return [{k: v[d["labels"] > 0] for k, v in d.items()} for d in out]

    def no_weight_decay(self) -> set[str]:
        return {f"detector.backbone.encoder.{n}" for n in self.encoder.no_weight_decay()}

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer decay over the encoder's depth (ViTDet's 0.7 for ViT-B); the pyramid and the heads, matched
        by nothing, are the last group, at the full rate."""
        prefix = "^detector\\.backbone\\.encoder\\."
        inner = self.encoder.group_matcher(coarse)
        stem = "|".join(prefix + p.lstrip("^") for p in inner["stem"].split("|"))
        return {"stem": stem, "blocks": [(prefix + r"blocks\.(\d+)", None)]}


def _checked_args(kind: str, extra: dict) -> dict:
    """model.detector_args, refused by name when the torchvision class takes no such argument."""
    cls = CLASSES[kind]
    taken = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    owned = {"min_size", "max_size", "image_mean", "image_std", "size_divisible", "num_classes", "backbone", "anchor_generator",
             "rpn_anchor_generator", "box_roi_pool", "head", "rpn_head", "box_head", "box_predictor", "score_thresh",
             "box_score_thresh", "detections_per_img", "box_detections_per_img",
             "mask_roi_pool", "mask_head", "mask_predictor"}  # set from the recipe, or modules
    bad = sorted(k for k in extra if k not in taken or k in owned)
    if bad:
        raise VitError(f"model.detector_args {bad} are not {cls.__name__} arguments vitcli passes through; the size, "
                       "normalisation and classes come from the recipe. See torchvision's detection models for the others.")
    return dict(extra)


def _freeze_classifier_parts(encoder: nn.Module) -> None:
    """A detection backbone reads the last block's tokens, as ViTDet's ViT (which has no final norm): the
    classifier's head goes, and its final norm and pooling stay in the weights (so a detector's encoder is a
    whole ViT that any reader takes) but are frozen, since they get no gradient (DDP refuses those)."""
    encoder.reset_classifier(0)
    for name in ("norm", "fc_norm", "attn_pool"):
        part = getattr(encoder, name, None)
        if isinstance(part, nn.Module):
            part.requires_grad_(False)
