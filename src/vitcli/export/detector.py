"""`vit export` of a detection checkpoint.

- onnx: torch.onnx's TorchScript exporter (torchvision's detection models trace there; the dynamo exporter
  does not take their data-dependent post-processing): one float image (C, size, size) in [0, 1], the
  checkpoint's size, in; `boxes` (N, 4, x0 y0 x1 y1 in its pixels), `scores` (N,) and `labels` (N,, 1..K) out,
  and from a Mask R-CNN `masks` (N, 1, size, size) probabilities. All four detectors export and are verified.
  The window partition and the pyramid are traced at that size, so the file takes that size only.
- vitcli: the checkpoint itself (.safetensors with its metadata).
exported-program, hf and timm have no detector to write (torch.export stops at the post-processing's
data-dependent shapes; transformers and timm have no class for a torchvision detector on a ViT).
Each file is run back and its detections compared with PyTorch's on two images.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vitcli.errors import VitError
from vitcli.io.paths import atomic_write
from vitcli.io.meta import CheckpointMeta
from vitcli.models.adapt import meta_for_model, model_from_checkpoint, save_state_dict
from vitcli.models.config import input_channels

DETECTOR_FORMATS = ("onnx", "vitcli")
OUTPUTS = ("boxes", "scores", "labels")


def outputs(model: nn.Module) -> tuple[str, ...]:
    return (*OUTPUTS, "masks") if model.masks else OUTPUTS


class _OneImage(nn.Module):
    """A detector as ONNX sees it: one image in, three tensors (four with masks) out."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, image: torch.Tensor):
        found = self.detector([image])[0]
        return tuple(found[k] for k in outputs(self.detector))


def export_detector(model: nn.Module, ck, fmt: str, out: Path) -> dict[str, Any]:
    if fmt not in DETECTOR_FORMATS:
        why = "torch.export stops at its data-dependent post-processing" if fmt == "exported-program" else \
            "it has no model class for a torchvision detector on a ViT"
        raise VitError(f"--format {fmt} cannot hold a detector ({why}); export it as {' or '.join(DETECTOR_FORMATS)} "
                       "(each verified against PyTorch).")
    size = model.spec.size
    generator = torch.Generator().manual_seed(0)
    images = [torch.rand(input_channels(model), size, size, generator=generator) for _ in range(2)]
    run = _write_onnx(model, ck.meta, out, images[0]) if fmt == "onnx" else _write_vitcli(model, ck.meta, out)
    worst, same = 0.0, True
    with torch.no_grad():
        for image in images:
            diff = _detection_diff(model([image])[0], run(image))
            same, worst = same and diff is not None, max(worst, diff or 0.0)
    return {"format": fmt, "out": str(out), "checkpoint": str(ck.source), "model": ck.meta.model, "task": "detection",
            "detector": model.spec.kind, "img_size": [size, size], "num_classes": model.num_classes, "max_abs_diff": worst,
            "verified": same and worst <= 1e-3}  # boxes in pixels


def _detection_diff(want: dict, got: dict, margin: float = 1e-4) -> float | None:
    """The largest box, score (or mask probability) difference between each detection and its counterpart of the
    same label in the other list (None: one has no counterpart). Detections scoring within `margin` of the lowest one kept
    are left out: at the cut (score threshold, detections_per_img) ties fall either way."""
    worst = 0.0
    for a, b in ((want, got), (got, want)):
        if len(a["scores"]) == 0:
            continue
        cut = float(min(a["scores"].min(), b["scores"].min() if len(b["scores"]) else a["scores"].min())) + margin
        for box, score, label in zip(a["boxes"].float(), a["scores"].float(), a["labels"].long()):
            if score <= cut:
                continue
            same = b["labels"].long() == label
            if not same.any():
                return None
            gaps = torch.maximum((b["boxes"][same].float() - box).abs().amax(dim=1), (b["scores"][same].float() - score).abs())
            worst = max(worst, float(gaps.min()))
        if "masks" in a:  # the masks of the same detections (matched by box and score above)
            for i in range(len(a["scores"])):
                if float(a["scores"][i]) > cut:
                    same = (b["labels"].long() == a["labels"][i].long()).nonzero()[:, 0]
                    j = same[(b["boxes"][same].float() - a["boxes"][i].float()).abs().amax(dim=1).argmin()]
                    worst = max(worst, float((b["masks"][j].float() - a["masks"][i].float()).abs().max()))
    return worst


def _write_onnx(model: nn.Module, meta: CheckpointMeta, out: Path, example: torch.Tensor):
    import onnxruntime as ort

    wrapped = _OneImage(model).eval()

    def save(tmp: Path) -> None:
        with warnings.catch_warnings():  # the tracer's notes on torchvision's Python-side shape arithmetic
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapped, (example,), str(tmp), dynamo=False, opset_version=17, input_names=["image"],
                              output_names=list(outputs(model)))
        import onnx

        proto = onnx.load(str(tmp))
        onnx.helper.set_model_props(proto, {"task": "detection", "detector": model.spec.kind, "size": str(model.spec.size),
                                            "class_names": ",".join(meta.class_names or []),
                                            "labels": "1..K, category index + 1 (0: background)"})
        onnx.save(proto, str(tmp))

    atomic_write(out, save, "--out")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # Mask R-CNN's paste loop warns of every shape the tracer saw differently
    session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])

    def run(image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(v) for k, v in zip(outputs(model), session.run(None, {"image": image.numpy()}))}

    return run


def _write_vitcli(model: nn.Module, meta: CheckpointMeta, out: Path):
    save_state_dict(out, model.state_dict(), meta_for_model(model, meta), what="--out")
    loaded, _ = model_from_checkpoint(out)
    return lambda image: loaded([image])[0]
