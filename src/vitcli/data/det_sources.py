"""Turn `--dataset NAME|PATH` (+ `--data-dir`) into one split of a detection set, as a `BoxSet`
(data/boxes.py):

- the built-in `digits-det` (builtin.py);
- a named Hub set in the Hugging Face detection schema (`cppe-5`), or a save_to_disk copy of one: an
  image column and `objects` with COCO `bbox` ([x, y, w, h]) and `category`;
- a COCO folder: `annotations/instances_SPLIT.json` (or `instances_SPLIT.json` beside the images) over
  the images, which are looked up under `SPLIT/`, `images/SPLIT/`, `images/` or the folder itself
  (`train2017` reads as split `train`). Category ids become 0-based in the order of their ids
  (detectron2's mapping), named by the file's categories.
Class names otherwise come from the objects' ClassLabel, a `classes.txt` / `classes.json` beside the data,
or numbers up to the largest category. A single split gives 90% to training and 10% to evaluation.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional

import datasets

from vitcli.data import builtin
from vitcli.data.boxes import BoxSet, objects_feature
from vitcli.data.instance_masks import rle_counts
from vitcli.data.hub import load_hub_split
from vitcli.data.registry import DatasetSpec
from vitcli.data.seg_layouts import class_file
from vitcli.data.shard_index import is_shard_source
from vitcli.data.shard_sets import read_split, shard_task
from vitcli.data.sources import named_task, resolve_source
from vitcli.data.splits import Role, pick_split, saved_splits, seeded_subset
from vitcli.errors import VitError

FORMAT_HELP = ("a COCO folder (annotations/instances_SPLIT.json over the images), a save_to_disk copy with an image "
               "column and objects {bbox: [x, y, w, h], category}, digits-det, or a named detection set (cppe-5)")


def load_box_split(dataset: str, split: Optional[str] = None, *, role: Role = "train", data_dir: Optional[str] = None,
                   subset: Optional[int] = None, seed: int = 0, carve: bool = True,
                   say: Optional[Callable[[str], object]] = None) -> BoxSet:
    """One split of a detection set (split None: the set's training or evaluation split for `role`)."""
    if data_dir is None and is_shard_source(dataset):  # read whole into the datasets cache (training streams them)
        if shard_task(dataset)[0] != "detection":
            raise VitError(f"The shards at {dataset} hold {shard_task(dataset)[0]} samples, no boxes. Write the detection "
                           "set with `vit shards` (it stores each image's boxes as KEY.json).")
        ds, names, split_name = read_split(dataset, split, role)
        ds, split_name = seeded_subset(ds, split_name, subset, seed)
        return BoxSet(ds, len(names), names, dataset, split_name)
    spec, path = resolve_source(dataset, data_dir)
    if spec is not None and spec.task != "detection" and path is None:
        raise VitError(f"'{spec.name}' is a {spec.task} set; detection needs boxes per image. Use {FORMAT_HELP}.")
    splits, names = _splits(spec, path)
    name = spec.name if spec else str(path)
    wanted = split or (None if spec is None else (spec.train_split if role == "train" else spec.eval_split))
    ds, split_name = pick_split(splits, wanted, role, name, carve)
    if len(ds) == 0:
        raise VitError(f"Split '{split_name}' of '{name}' has no images.")
    if names is None:
        top = max((max(o["category"], default=-1) for d in splits.values() for o in d["objects"]), default=-1)
        names = [str(i) for i in range(top + 1)]
        if say is not None:
            say(f"{name}: no class names given, so {len(names)} categories (ids 0-{top} found in the objects).")
    ds, split_name = seeded_subset(ds, split_name, subset, seed)
    return BoxSet(ds, len(names), list(names), name, split_name)


def _splits(spec: Optional[DatasetSpec], path: Optional[Path]) -> tuple[dict[str, datasets.Dataset], Optional[list[str]]]:
    if spec is not None and spec.builtin:
        return dict(builtin.digits_det_splits()), list(builtin.DIGITS_CLASSES)
    if path is None:
        assert spec is not None
        return _standardised({s: load_hub_split(spec, s) for s in (spec.train_split, spec.eval_split)}, spec.name, None)
    if not path.is_dir():
        raise VitError(f"'{path}' is a file; pass {FORMAT_HELP}.")
    splits = saved_splits(path)
    if splits is not None:
        return _standardised(splits, str(path), class_file(path))
    coco = read_coco_folder(path)
    if coco is None:
        raise VitError(f"'{path}' is not a detection set vitcli reads: give {FORMAT_HELP}.")
    return coco


def _standardised(splits: dict[str, datasets.Dataset], where: str, names: Optional[list[str]]
                  ) -> tuple[dict[str, datasets.Dataset], Optional[list[str]]]:
    """Hub-schema splits with exactly the columns image and objects."""
    features = next(iter(splits.values())).features
    images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    if not images or "objects" not in features:
        raise VitError(f"'{where}' needs an image column and an objects column ({{bbox: [x, y, w, h], category}}, the "
                       f"Hugging Face detection schema); its columns: {list(features)}.")
    if names is None:
        names = _category_names(features["objects"])
    out = {}
    for name, ds in splits.items():
        ds = ds.select_columns([images[0], "objects"])
        out[name] = ds.rename_column(images[0], "image") if images[0] != "image" else ds
    return out, names


def _category_names(objects) -> Optional[list[str]]:
    """The ClassLabel names of an objects feature's category, if it has them."""
    inner = getattr(objects, "feature", objects)
    category = inner.get("category") if isinstance(inner, dict) else None
    category = getattr(category, "feature", category)
    return list(category.names) if isinstance(category, datasets.ClassLabel) else None


def read_coco_folder(path: Path) -> Optional[tuple[dict[str, datasets.Dataset], list[str]]]:
    """The splits and category names of a COCO folder, or None when `path` has no instances_*.json."""
    files = coco_files(path)
    if not files:
        return None
    splits, names, ids = {}, None, None
    for file in files:
        raw = file.stem[len("instances_"):]
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise VitError(f"{file} is not a readable COCO annotation file ({e}).") from e
        categories = sorted(data.get("categories", []), key=lambda c: c["id"])
        if ids is None:
            ids, names = [c["id"] for c in categories], [str(c.get("name", c["id"])) for c in categories]
        elif [c["id"] for c in categories] != ids:
            raise VitError(f"{file} lists other categories than {files[0].name}; the splits of a COCO set share one list.")
        splits[re.sub(r"\d{4}$", "", raw) or raw] = _coco_split(data, _image_root(path, raw, data, file), file, ids)
    return splits, names


def _image_root(path: Path, split: str, data: dict, file: Path) -> Path:
    first = next(iter(data.get("images", [])), None)
    candidates = [path / split, path / "images" / split, path / "images", path]
    if first is None:
        return candidates[0]
    for root in candidates:
        if (root / first["file_name"]).is_file():
            return root
    raise VitError(f"{file} names {first['file_name']}, found under none of {', '.join(str(c) for c in candidates)}. "
                   "Put the images in one of those folders.")


def _coco_split(data: dict, root: Path, file: Path, ids: list[int]) -> datasets.Dataset:
    """One split of a COCO file; with masks (each object's `segmentation`: polygons or RLE, as compressed RLE
    counts over its image, data/instance_masks.py) when any annotation has one."""
    index = {cid: i for i, cid in enumerate(ids)}
    masks = any(ann.get("segmentation") for ann in data.get("annotations", []))
    images = {im["id"]: im for im in data["images"]}
    fields = ("bbox", "category", "iscrowd", "area", *(("segmentation",) if masks else ()))
    objects: dict[int, dict[str, list]] = {im["id"]: {f: [] for f in fields} for im in data["images"]}
    for ann in data.get("annotations", []):
        if ann["image_id"] not in objects or ann["category_id"] not in index:
            raise VitError(f"{file}: annotation {ann.get('id')} names image {ann['image_id']} or category "
                           f"{ann['category_id']}, which the file does not list.")
        o = objects[ann["image_id"]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        o["bbox"].append([x, y, w, h])
        o["category"].append(index[ann["category_id"]])
        o["iscrowd"].append(int(ann.get("iscrowd", 0)))
        o["area"].append(float(ann.get("area", w * h)))
        if masks:
            o["segmentation"].append(_mask_counts(ann, images[ann["image_id"]], file))
    rows = {"image": [{"path": str(root / im["file_name"]), "bytes": None} for im in data["images"]],
            "objects": [objects[im["id"]] for im in data["images"]]}
    return datasets.Dataset.from_dict(rows, features=datasets.Features({"image": datasets.Image(), "objects": objects_feature(masks)}))


def _mask_counts(ann: dict, image: dict, file: Path) -> str:
    """An annotation's mask as compressed RLE counts ("" without one: the object's box stands for it)."""
    if not ann.get("segmentation"):
        return ""
    if "height" not in image or "width" not in image:
        raise VitError(f"{file}: image {image['id']} has masks but no height and width; COCO lists both for every image.")
    try:
        return rle_counts(ann["segmentation"], int(image["height"]), int(image["width"]))
    except (TypeError, ValueError, KeyError, IndexError) as e:
        raise VitError(f"{file}: annotation {ann.get('id')}'s segmentation is neither polygons nor RLE ({e}).") from e


def is_detection_source(dataset: str, data_dir: Optional[str] = None) -> bool:
    """Whether `dataset` names a detection set: a registry set of that task, a COCO folder, a
    save_to_disk copy with an objects column, or tar shards of boxes."""
    task, path = named_task(dataset, data_dir)
    if path is None:
        return task == "detection"
    splits = saved_splits(path)
    if splits is not None:
        return "objects" in next(iter(splits.values())).features
    return bool(coco_files(path))


def coco_files(path: Path) -> list[Path]:
    """A COCO folder's annotation files: annotations/instances_*.json, else instances_*.json beside the images."""
    return sorted((path / "annotations").glob("instances_*.json")) or sorted(path.glob("instances_*.json"))
