"""Turn `--dataset NAME|PATH` (+ `--data-dir`) into one split of a segmentation set, as a `MaskSet`
(data/masks.py): the built-in `digits-seg`, a named Hub set, a save_to_disk copy with the Hub schema
(an image column and a mask column: annotation, mask, label, segmentation, semantic_map), or a folder
in one of the layouts of data/seg_layouts.py. A folder with a single split gives 90% to training and
10% to evaluation (seed 0), as classification folders do."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import datasets

from vitcli.data import builtin
from vitcli.data.hub import load_hub_split
from vitcli.data.masks import MaskSet, largest_class
from vitcli.data.registry import DatasetSpec
from vitcli.data.seg_layouts import Layout, class_file, read_layout
from vitcli.data.shard_index import is_shard_source
from vitcli.data.shard_sets import read_split, shard_task
from vitcli.data.sources import named_task, resolve_source
from vitcli.data.splits import Role, pick_split, saved_splits, seeded_subset
from vitcli.errors import VitError

MASK_COLUMNS = ("mask", "annotation", "label", "segmentation", "semantic_map", "seg")


def load_mask_split(dataset: str, split: Optional[str] = None, *, role: Role = "train", data_dir: Optional[str] = None,
                    subset: Optional[int] = None, seed: int = 0, carve: bool = True,
                    say: Optional[Callable[[str], object]] = None) -> MaskSet:
    """One split of a segmentation set (split None: the set's training or evaluation split for `role`); a
    split of tar shards is read whole (training streams them: data.shard_sets.stream_split)."""
    if data_dir is None and is_shard_source(dataset):
        task, reduce = shard_task(dataset)
        if task != "segmentation":
            raise VitError(f"The shards at {dataset} hold classification samples (labels, no masks). Write the segmentation "
                           "set with `vit shards` (it stores each mask as KEY.seg.png).")
        ds, names, split_name = read_split(dataset, split, role)
        ds, split_name = seeded_subset(ds, split_name, subset, seed)
        return MaskSet(ds, len(names), names, dataset, split_name, reduce)
    spec, path = resolve_source(dataset, data_dir)
    if spec is not None and spec.task != "segmentation" and path is None:
        raise VitError(f"'{spec.name}' is a classification set (a class per image); segmentation needs a mask per image. "
                       "Use digits-seg, ade20k, or a folder of images and masks (see README: Semantic segmentation).")
    layout = _layout(spec, path, dataset)
    name = spec.name if spec else str(path)
    ds, split_name = pick_split(layout.splits, split or (None if spec is None else (spec.train_split if role == "train" else spec.eval_split)),
                           role, name, carve)
    if len(ds) == 0:
        raise VitError(f"Split '{split_name}' of '{name}' has no images.")
    names = layout.class_names
    if names is None and spec is not None and spec.num_classes:
        names = [str(i) for i in range(spec.num_classes)]
    if names is None:  # count the classes in the masks, once (no names given anywhere)
        top = max(largest_class(d, layout.reduce_zero_label) for d in layout.splits.values())
        names = [str(i) for i in range(top + 1)]
        if say is not None:
            say(f"{name}: no classes.txt / classes.json, so {len(names)} classes (ids 0-{top} found in the masks).")
    ds, split_name = seeded_subset(ds, split_name, subset, seed)
    return MaskSet(ds, len(names), list(names), name, split_name, layout.reduce_zero_label)


def _layout(spec: Optional[DatasetSpec], path: Optional[Path], dataset: str) -> Layout:
    if spec is not None and spec.builtin:
        return Layout("builtin", dict(builtin.digits_seg_splits()), list(builtin.DIGITS_SEG_CLASSES))
    if path is None:
        assert spec is not None
        splits = {s: load_hub_split(spec, s) for s in (spec.train_split, spec.eval_split)}
        return _standardised(splits, spec, spec.name, None)
    if not path.is_dir():
        raise VitError(f"'{path}' is a file; pass a folder of images and masks (img_dir/ + ann_dir/, ADEChallengeData2016, "
                       "VOC2012) or a save_to_disk directory.")
    splits = saved_splits(path)
    if splits is not None:
        return _standardised(splits, spec, str(path), class_file(path))
    layout = read_layout(path)
    if layout is None:
        raise VitError(f"'{path}' is not a segmentation layout vitcli reads: give img_dir/SPLIT/ + ann_dir/SPLIT/ (masks as "
                       ".png of the same names), ADE20K's ADEChallengeData2016, Pascal VOC 2012, or a save_to_disk copy "
                       "with an image and a mask column.")
    return layout


def _standardised(splits: dict[str, datasets.Dataset], spec: Optional[DatasetSpec], where: str,
                  names: Optional[list[str]]) -> Layout:
    """Hub-schema splits with exactly the columns image and mask."""
    features = next(iter(splits.values())).features
    images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    wanted = [spec.label_column] if spec is not None else []
    mask_col = next((c for c in [*wanted, *MASK_COLUMNS] if c in images), None)
    image_col = next((c for c in images if c != mask_col), None)
    if mask_col is None or image_col is None:
        raise VitError(f"'{where}' needs two image columns, the image and its mask (one of {', '.join(MASK_COLUMNS)}); "
                       f"its columns: {list(features)}.")
    out = {}
    for name, ds in splits.items():
        ds = ds.select_columns([image_col, mask_col])
        ds = ds.rename_columns({c: n for c, n in ((image_col, "image"), (mask_col, "mask")) if c != n})
        out[name] = ds
    reduce = bool(spec.reduce_zero_label) if spec is not None else False
    return Layout("hub", out, names, reduce_zero_label=reduce)


def is_segmentation_source(dataset: str, data_dir: Optional[str] = None) -> bool:
    """Whether `dataset` names a segmentation set: a registry set of that task, a folder in a segmentation
    layout, a save_to_disk copy with an image and a mask column, or shards whose index says so."""
    task, path = named_task(dataset, data_dir)
    if path is None:
        return task == "segmentation"
    splits = saved_splits(path)
    if splits is not None:
        images = [c for c, f in next(iter(splits.values())).features.items() if isinstance(f, datasets.Image)]
        return len(images) >= 2 and any(c in MASK_COLUMNS for c in images)
    return read_layout(path) is not None
