"""What a checkpoint says about itself, typed: the model to build, how to feed it, where it came from.

On disk (the JSON in a .safetensors header, a sharded run's training state) it stays the flat dict that
earlier versions wrote, so their run directories and files still load; `CheckpointMeta.from_dict` and
`to_dict` are the only two places that know that layout.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How a model expects its images: normalisation, resize interpolation, and the centre-crop fraction
    at evaluation (timm's pretrained_cfg). The defaults are the paper's: mean = std = 0.5."""

    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], in_chans: int = 3) -> Preprocessing | None:
        """From mean / std / interpolation / crop_pct entries; None when none is there. Missing or
        unusable entries take the defaults (mean = std = 0.5 per channel, bicubic, 0.875)."""
        if not any(d.get(k) is not None for k in ("mean", "std", "interpolation", "crop_pct")):
            return None
        interp = d.get("interpolation")
        return cls(mean=tuple(float(m) for m in d.get("mean") or [0.5] * in_chans),
                   std=tuple(float(s) for s in d.get("std") or [0.5] * in_chans),
                   interpolation=interp if interp in INTERPOLATIONS else "bicubic",
                   crop_pct=float(d.get("crop_pct") or 0.875))

    def to_dict(self) -> dict[str, Any]:
        return {"mean": list(self.mean), "std": list(self.std), "interpolation": self.interpolation,
                "crop_pct": self.crop_pct}


@dataclasses.dataclass
class CheckpointMeta:
    """A checkpoint's metadata.

    Attributes:
        model: registered model name to build.
        model_args: create_model overrides that rebuild the exact architecture.
        num_classes: head outputs (0: none).
        img_size: [h, w] the weights are laid out for.
        preprocess: normalisation / interpolation / crop the weights were trained with (None: unknown).
        class_names: one per class, when known.
        format: the naming the weights were read in: "vitcli", "timm", "hf" or "npz".
        inferred: the architecture was inferred from the tensors (a foreign file).
        pre_logits: the weights have a representation layer before the head (old Google checkpoints).
        dataset / data_dir / objective: what the run that wrote it trained on, and how.
        task: "multilabel" for a head of independent sigmoids (its threshold in `training`), "segmentation" for
            a Segmenter (the weights: encoder.* and decoder.*), None otherwise (classification).
        decoder: a segmenter's decoder (kind, dim, layers, heads, dropout); model / model_args describe its encoder.
        detector: a detector's settings (kind, size, window attention, pyramid; models/detector.py), task
            "detection" (the weights: detector.*, its encoder under detector.backbone.encoder.*).
        training: the rest of what a run records (step, top1, score ...), kept as written.
    """

    model: str
    model_args: dict[str, Any]
    num_classes: int = 0
    img_size: list[int] | None = None
    preprocess: Preprocessing | None = None
    class_names: list[str] | None = None
    format: str = "vitcli"
    inferred: bool = False
    pre_logits: bool = False
    dataset: str | None = None
    data_dir: str | None = None
    objective: str | None = None
    task: str | None = None
    decoder: dict[str, Any] | None = None
    detector: dict[str, Any] | None = None
    training: dict[str, Any] = dataclasses.field(default_factory=dict)

    _FIELDS = ("format", "model", "model_args", "num_classes", "img_size", "class_names", "inferred", "pre_logits",
               "dataset", "data_dir", "objective", "task", "decoder", "detector")
    _PREPROCESS = ("mean", "std", "interpolation", "crop_pct")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> CheckpointMeta:
        """From the flat dict earlier versions wrote (and `to_dict` writes)."""
        args = dict(d.get("model_args") or {})
        in_chans = int(args.get("in_chans") or 3)
        img = d.get("img_size") or args.get("img_size")
        return cls(
            model=str(d.get("model") or ""),
            model_args=args,
            num_classes=int(d.get("num_classes") if d.get("num_classes") is not None else args.get("num_classes", 0)),
            img_size=([int(img), int(img)] if isinstance(img, int) else [int(s) for s in img]) if img else None,
            preprocess=Preprocessing.from_dict(d, in_chans),
            class_names=list(d["class_names"]) if d.get("class_names") else None,
            format=str(d.get("format") or "vitcli"),
            inferred=bool(d.get("inferred")),
            pre_logits=bool(d.get("pre_logits")),
            dataset=d.get("dataset"),
            data_dir=d.get("data_dir"),
            objective=d.get("objective"),
            task=d.get("task"),
            decoder=dict(d["decoder"]) if d.get("decoder") else None,
            detector=dict(d["detector"]) if d.get("detector") else None,
            training={k: v for k, v in d.items() if k not in cls._FIELDS + cls._PREPROCESS},
        )

    def to_dict(self) -> dict[str, Any]:
        """The flat, JSON-ready layout on disk."""
        out: dict[str, Any] = {"format": self.format, "model": self.model, "model_args": dict(self.model_args),
                               "num_classes": self.num_classes, "img_size": self.img_size}
        if self.preprocess is not None:
            out.update(self.preprocess.to_dict())
        for key in ("class_names", "dataset", "data_dir", "objective", "task", "decoder", "detector"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.inferred:
            out["inferred"] = True
        if self.pre_logits:
            out["pre_logits"] = True
        out.update(self.training)
        return out

    def replace(self, **changes: Any) -> CheckpointMeta:
        return dataclasses.replace(self, **changes)
