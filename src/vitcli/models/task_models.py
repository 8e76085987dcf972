"""The models that put a task's head on an encoder (a Segmenter's decoder, a detector), by the task their
checkpoints name: how each writes its metadata and is rebuilt from a checkpoint. models/adapt.py reads and
writes every checkpoint through these, so a new dense task is one entry here."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

from torch import nn

from vitcli.io.meta import CheckpointMeta
from vitcli.models.det_checkpoint import detector_from_checkpoint, detector_meta
from vitcli.models.detector import Detector
from vitcli.models.seg_checkpoint import segmenter_from_checkpoint, segmenter_meta
from vitcli.models.segmenter import Segmenter


class TaskModel(NamedTuple):
    model_class: type
    meta: Callable[..., CheckpointMeta]  # (model, base meta, **training) -> its checkpoint metadata
    from_checkpoint: Callable[..., tuple[nn.Module, Any]]  # (LoadedCheckpoint, num_classes=, **encoder options)


TASK_MODELS: dict[str, TaskModel] = {
    "segmentation": TaskModel(Segmenter, segmenter_meta, segmenter_from_checkpoint),
    "detection": TaskModel(Detector, detector_meta, detector_from_checkpoint),
}


def task_meta(model: nn.Module, base: CheckpointMeta | None, **training: Any) -> CheckpointMeta | None:
    """A task model's checkpoint metadata; None for a plain encoder or classifier."""
    for entry in TASK_MODELS.values():
        if isinstance(model, entry.model_class):
            return entry.meta(model, base, **training)
    return None
