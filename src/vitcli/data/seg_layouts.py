"""The folder layouts of segmentation sets, read into {split: Dataset(image, mask)} (data/masks.py).

- generic (mmseg's custom layout): `img_dir/SPLIT/NAME.jpg|png` + `ann_dir/SPLIT/NAME.png`;
- ADE20K's `ADEChallengeData2016`: `images/{training,validation}/*.jpg` + `annotations/.../*.png`, 0 is
  "other" (reduce_zero_label), names from its `objectInfo150.txt` (or .csv);
- Pascal VOC 2012 (the folder, its `VOC2012/` or `VOCdevkit/VOC2012/`): `JPEGImages/*.jpg` +
  `SegmentationClass/*.png` over the lists `ImageSets/Segmentation/{train,val,trainval}.txt`, 21 classes.
Masks are matched to images by file stem; an image without one is an error naming it.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets

from vitcli.errors import VitError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
               "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
ADE_SPLITS = {"training": "train", "validation": "val"}
FEATURES = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})


@dataclass
class Layout:
    """What a folder holds: its splits, the class names it gives (None: count the masks), how 0 reads."""

    kind: str
    splits: dict[str, datasets.Dataset]
    class_names: Optional[list[str]] = None
    reduce_zero_label: bool = False


def read_layout(path: Path) -> Optional[Layout]:
    """The segmentation layout at `path`, or None when it is none of them."""
    voc = next((p for p in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012") if (p / "SegmentationClass").is_dir()), None)
    ade = next((p for p in (path, path / "ADEChallengeData2016") if (p / "annotations" / "training").is_dir()), None)
    if (path / "img_dir").is_dir() and (path / "ann_dir").is_dir():
        layout = _generic(path)
    elif ade is not None:
        layout = Layout("ade20k", {ADE_SPLITS[d.name]: _table(d, ade / "annotations" / d.name, str(path))
                                   for d in sorted((ade / "images").iterdir()) if d.name in ADE_SPLITS},
                        _ade_names(ade), reduce_zero_label=True)
    elif voc is not None:
        layout = _voc(voc)
    else:
        return None
    names = class_file(path)
    if names is not None:
        layout.class_names = names
    return layout


def class_file(folder: Path) -> Optional[list[str]]:
    """Class names from classes.txt (one a line) or classes.json (a list) in `folder`, if there is one."""
    if (folder / "classes.json").is_file():
        try:
            names = json.loads((folder / "classes.json").read_text())
        except ValueError as e:
            raise VitError(f"{folder / 'classes.json'} is not valid JSON ({e}); write a list of class names.") from e
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise VitError(f"{folder / 'classes.json'} must be a list of class names, in class-id order.")
        return names
    if (folder / "classes.txt").is_file():
        return [line.strip() for line in (folder / "classes.txt").read_text().splitlines() if line.strip()]
    return None


def _generic(root: Path) -> Layout:
    splits = {d.name: _table(d, root / "ann_dir" / d.name, str(root)) for d in sorted((root / "img_dir").iterdir()) if d.is_dir()}
    if not splits:
        raise VitError(f"{root / 'img_dir'} has no split folders. Put images in img_dir/train/ and img_dir/val/, their masks "
                       "in ann_dir/train/ and ann_dir/val/ (same file names, .png).")
    return Layout("generic", splits)


def _voc(root: Path) -> Layout:
    lists = root / "ImageSets" / "Segmentation"
    if not lists.is_dir():
        raise VitError(f"{root} has SegmentationClass/ but no ImageSets/Segmentation/ split lists (train.txt, val.txt).")
    splits = {}
    for listing in sorted(lists.glob("*.txt")):
        stems = [s.strip() for s in listing.read_text().split() if s.strip()]
        images = [root / "JPEGImages" / f"{s}.jpg" for s in stems]
        splits[listing.stem] = _pairs(images, root / "SegmentationClass", str(root))
    return Layout("voc", splits, list(VOC_CLASSES))


def _table(image_dir: Path, mask_dir: Path, where: str) -> datasets.Dataset:
    return _pairs(sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES), mask_dir, where, image_dir)


def _pairs(images: list[Path], mask_dir: Path, where: str, image_dir: Optional[Path] = None) -> datasets.Dataset:
    """Dataset(image, mask) of the images and the masks of the same stem (in the same sub-folder) under mask_dir."""
    masks = [mask_dir / (p.relative_to(image_dir).with_suffix(".png") if image_dir else Path(p.stem + ".png")) for p in images]
    missing = [(i, m) for i, m in zip(images, masks) if not m.is_file()]
    if missing:
        raise VitError(f"{len(missing)} image(s) of {where} have no mask (first: {missing[0][0]} has no {missing[0][1]}). "
                       "Every image needs a .png mask of the same name.")
    if not images:
        raise VitError(f"No images in {image_dir or where}. Put the split's images there, their masks in {mask_dir}.")
    return datasets.Dataset.from_dict({"image": [str(p) for p in images], "mask": [str(m) for m in masks]}, features=FEATURES)


def _ade_names(root: Path) -> Optional[list[str]]:
    """The 150 class names of ADE20K's objectInfo150 file (first synonym of each), if the copy has it."""
    for name in ("objectInfo150.txt", "objectInfo150.csv"):
        path = root / name
        if path.is_file():
            text = path.read_text(encoding="utf-8", errors="replace")
            rows = list(csv.reader(text.splitlines(), delimiter="\t" if name.endswith(".txt") else ","))
            body = [r for r in rows[1:] if r]
            return [r[-1].replace(";", ",").split(",")[0].strip() for r in body]
    return None
