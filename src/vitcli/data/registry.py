"""Named data sets: where each lives on the Hugging Face Hub and which columns and splits it uses.

`--dataset` takes one of these names (or an alias), or a local path. Two sets are built in and need
no download: `digits` (scikit-learn's 8x8 digits, for smoke tests and the quickstart) and `synthetic`
(random images, for benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from vitcli.errors import VitError, did_you_mean


@dataclass(frozen=True)
class DatasetSpec:
    """One named data set.

    Args:
        name: the registry name users type.
        hub_id: Hugging Face Hub repository id; None for the built-in sets.
        config: the Hub config (subset) name, if the repository has several.
        image_column / label_column: column names in the Hub copy (renamed to image / label).
        train_split / eval_split: default splits; "a+b" concatenates splits.
        num_classes: number of classes (used when the label column is not a ClassLabel).
        gated: the Hub copy needs an accepted licence and a token.
        note: one line shown by `vit datasets` / error messages.
        task: "classification", "segmentation" (then label_column is the mask column, data/masks.py) or
            "detection" (label_column: the objects column, data/boxes.py).
        reduce_zero_label: segmentation masks whose 0 means "unlabelled" (ADE20K): ignored, classes shift down.
    """

    name: str
    hub_id: Optional[str]
    config: Optional[str] = None
    image_column: str = "image"
    label_column: str = "label"
    train_split: str = "train"
    eval_split: str = "test"
    num_classes: Optional[int] = None
    gated: bool = False
    note: str = ""
    task: str = "classification"
    reduce_zero_label: bool = False

    @property
    def builtin(self) -> bool:
        return self.hub_id is None


_SPECS = [
    DatasetSpec("digits", None, num_classes=10, note="scikit-learn 8x8 digits, 1437 train / 360 test, built in"),
    DatasetSpec("synthetic", None, num_classes=1000, note="random RGB images, 1024 train / 256 test, for benchmarks"),
    DatasetSpec("cifar10", "uoft-cs/cifar10", image_column="img", num_classes=10),
    DatasetSpec("cifar100", "uoft-cs/cifar100", image_column="img", label_column="fine_label", num_classes=100),
    DatasetSpec("imagenet-1k", "ILSVRC/imagenet-1k", eval_split="validation", num_classes=1000, gated=True,
                note="ILSVRC 2012; gated: accept the licence on the Hub and log in"),
    # The paper's ImageNet-21k is the Fall 2011 release (21,841 classes, ~14M images). timm's webdataset copy
    # is that release; its validation split holds 40 images for each of the 11,821 largest classes only.
    DatasetSpec("imagenet-21k", "timm/imagenet-22k-wds", image_column="jpg", label_column="cls",
                eval_split="validation", num_classes=21841, gated=True,
                note="ImageNet Fall 2011 (21,841 classes) as webdataset shards; gated"),
    DatasetSpec("oxford-iiit-pet", "timm/oxford-iiit-pet", num_classes=37),
    # The standard 1020 / 1020 / 6149 split; like BiT and ViT we train on train+validation.
    DatasetSpec("oxford-flowers102", "dpdl-benchmark/oxford_flowers102", train_split="train+validation",
                num_classes=102),
    DatasetSpec("food101", "ethz/food101", eval_split="validation", num_classes=101),
    DatasetSpec("svhn", "ufldl-stanford/svhn", config="cropped_digits", num_classes=10),
    # semantic segmentation
    DatasetSpec("digits-seg", None, eval_split="val", num_classes=11, task="segmentation", label_column="mask",
                note="digits pasted on 32x32 canvases with pixel masks, 2000 train / 500 val, built in"),
    # ADE20K's SceneParsing benchmark (150 classes; 0 is "other", ignored), the Hub's copy of ADEChallengeData2016
    DatasetSpec("ade20k", "zhoubolei/scene_parse_150", eval_split="validation", num_classes=150, task="segmentation",
                label_column="annotation", reduce_zero_label=True, note="ADE20K SceneParsing, 150 classes"),
    # object detection (the Hugging Face detection schema: objects with COCO bbox and category)
    DatasetSpec("digits-det", None, eval_split="val", num_classes=10, task="detection", label_column="objects",
                note="digits pasted on 64x64 canvases with boxes, 2000 train / 500 val, built in"),
    DatasetSpec("cppe-5", "rishitdagli/cppe-5", num_classes=5, task="detection", label_column="objects",
                note="medical personal protective equipment, 1000 train / 29 test, 5 categories"),
]

REGISTRY: dict[str, DatasetSpec] = {s.name: s for s in _SPECS}

ALIASES: dict[str, str] = {
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "imagenet": "imagenet-1k",
    "imagenet1k": "imagenet-1k",
    "in1k": "imagenet-1k",
    "ilsvrc2012": "imagenet-1k",
    "imagenet21k": "imagenet-21k",
    "imagenet-22k": "imagenet-21k",
    "imagenet22k": "imagenet-21k",
    "in21k": "imagenet-21k",
    "in22k": "imagenet-21k",
    "pets": "oxford-iiit-pet",
    "oxford-pets": "oxford-iiit-pet",
    "oxford-iiit-pets": "oxford-iiit-pet",
    "flowers": "oxford-flowers102",
    "flowers102": "oxford-flowers102",
    "flowers-102": "oxford-flowers102",
    "oxford-flowers": "oxford-flowers102",
    "oxford-flowers-102": "oxford-flowers102",
    "food-101": "food101",
    "svhn-cropped": "svhn",
    "sklearn-digits": "digits",
    "digits-segmentation": "digits-seg",
    "digits-detection": "digits-det",
    "cppe5": "cppe-5",
    "scene-parse-150": "ade20k",
    "ade": "ade20k",
    "adechallengedata2016": "ade20k",
}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def list_datasets() -> list[str]:
    """Registry names (aliases not included), in registry order."""
    return list(REGISTRY)


def lookup(name: str) -> Optional[DatasetSpec]:
    """The spec for a registry name, alias or Hub id (case and '_'/'-' insensitive), or None."""
    key = _normalise(name)
    key = ALIASES.get(key, key)
    if key in REGISTRY:
        return REGISTRY[key]
    return next((s for s in _SPECS if s.hub_id and _normalise(s.hub_id) == key), None)


def get_spec(name: str) -> DatasetSpec:
    """Like lookup, but an unknown name is a VitError with the closest names and a hint."""
    spec = lookup(name)
    if spec is None:
        raise unknown_dataset_error(name)
    return spec


def unknown_dataset_error(name: str) -> VitError:
    return VitError(
        f"Unknown data set '{name}' (and no such file or folder)."
        f"{did_you_mean(_normalise(name), [*REGISTRY, *ALIASES])} "
        f"Named sets: {', '.join(REGISTRY)}. For your own images pass a path: a folder with one sub-folder per "
        "class (optionally inside train/ and test/), or a directory written by datasets' save_to_disk."
    )
