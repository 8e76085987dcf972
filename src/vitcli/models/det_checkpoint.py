"""A detector's checkpoint: one safetensors file of `detector.*` weights (its encoder, a whole ViT under timm's
keys, at `detector.backbone.encoder.*`); its metadata describes the encoder (model, model_args) as any
vitcli checkpoint does, with `task: detection`, the detector's settings, the class count (background
included) and the category names. Reading it rebuilds both, the encoder through the same adaptation as any
ViT (another resolution resamples its position table)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from vitcli.errors import VitError
from vitcli.io.meta import CheckpointMeta
from vitcli.models.detector import DETECTORS, Detector, DetectorSpec
from vitcli.models.load import LoadedCheckpoint

ENCODER_PREFIX = "detector.backbone.encoder."


def detector_meta(model: Detector, base: CheckpointMeta | None, **training: Any) -> CheckpointMeta:
    from vitcli.models.adapt import meta_for_model

    categories = model.num_classes - 1
    names = base.class_names if base is not None and base.class_names and len(base.class_names) == categories else None
    encoder = meta_for_model(model.encoder, base.replace(class_names=None) if base is not None else None, **training)
    return encoder.replace(num_classes=model.num_classes, class_names=names, task="detection", detector=model.spec.settings())


def detector_from_checkpoint(ck: LoadedCheckpoint, *, num_classes: int | None = None, **encoder_options: Any
                             ) -> tuple[Detector, LoadedCheckpoint]:
    """The Detector a checkpoint holds (eval mode); `num_classes` other than its own: new class-specific
    layers (a new detector of the same settings on the trained encoder and pyramid)."""
    from vitcli.models.adapt import model_from_checkpoint

    settings = dict(ck.meta.detector or {})
    if settings.get("kind") not in DETECTORS:
        raise VitError(f"{ck.source} is a detection checkpoint without a detector vitcli knows ({settings.get('kind')!r}); "
                       "write it again with vitcli.")
    encoder_sd = {k[len(ENCODER_PREFIX):]: v for k, v in ck.state_dict.items() if k.startswith(ENCODER_PREFIX)}
    rest = {k: v for k, v in ck.state_dict.items() if not k.startswith(ENCODER_PREFIX)}
    encoder_ck = replace(ck, state_dict=encoder_sd, meta=ck.meta.replace(task=None, detector=None, num_classes=0, class_names=None))
    encoder, read = model_from_checkpoint(encoder_ck, **encoder_options)
    pre = ck.meta.preprocess
    norm = {"mean": tuple(pre.mean), "std": tuple(pre.std)} if pre is not None else {}
    spec = DetectorSpec(num_classes=ck.meta.num_classes, **_spec_fields(settings), **norm)
    model = Detector(encoder, spec)
    notes = list(read.notes)
    if num_classes is not None and num_classes != ck.meta.num_classes:  # the encoder and pyramid carry over
        rest = {k: v for k, v in rest.items() if k.startswith("detector.backbone.")}
        model = Detector(encoder, replace(spec, num_classes=num_classes))
        notes.append(f"detection heads replaced: {ck.meta.num_classes} -> {num_classes} classes")
        missing, unexpected = model.load_state_dict(rest, strict=False)
        missing = [k for k in missing if k.startswith("detector.backbone.") and not k.startswith(ENCODER_PREFIX)]
    else:
        missing, unexpected = model.load_state_dict(rest, strict=False)
        missing = [k for k in missing if not k.startswith(ENCODER_PREFIX)]
    if missing or unexpected:
        raise VitError(f"{ck.source}: the detector's weights do not fit a {settings['kind']} detector (missing {missing[:3]}, "
                       f"unexpected {unexpected[:3]}). The file is damaged or was written by another program.")
    return model.eval(), replace(ck, notes=notes)


def _spec_fields(settings: dict) -> dict:
    out = {k: settings[k] for k in ("kind", "size", "window_size", "channels", "score_thresh", "detections_per_img") if k in settings}
    for key in ("global_blocks", "scale_factors"):
        if key in settings:
            out[key] = tuple(settings[key])
    out["extra"] = dict(settings.get("args") or {})
    return out
