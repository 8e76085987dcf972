"""Turn `--dataset NAME|PATH` (+ `--data-dir`) into one split as an `ImageSet`.

Every source ends as a `datasets.Dataset` with exactly two columns, `image` (an `Image()` feature, still
encoded: bytes or file paths, decoded only in the loader) and `label` (int), so the loader and the
trainer never care where the data came from. Sources:

- `digits`, `synthetic`: built in (see builtin.py).
- a named Hub set: `datasets.load_dataset(hub_id, config, split=...)` (see hub.py).
- a named set with `data_dir`: the same set read from a local copy with the Hub schema.
- a path to an image folder (one sub-folder per class, optionally inside train/ and test|val|validation/),
  read with datasets' `imagefolder` builder.
- a path to a `Dataset.save_to_disk` / `DatasetDict.save_to_disk` directory.

A local source with a single split (a folder with class sub-folders only, or one saved Dataset) has no
evaluation images, so training carves a fixed 10% of it (split names `train[90%]` / `train[10%]`),
stratified by class when every class has enough images (random otherwise), always with seed 0 so every
run trains and scores on the same images. `vit eval` scores such a folder whole (`carve=False`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable
from typing import Literal, Optional, Union

import datasets
import numpy as np

from vitcli.data import builtin
from vitcli.data.hub import load_hub_split, stream_hub_split
from vitcli.data.hub_stream import HubSet, streamed
from vitcli.data.indexing import index_folder
from vitcli.data.registry import DatasetSpec, list_datasets, lookup, unknown_dataset_error
from vitcli.data.shard_index import is_shard_source
from vitcli.data.multilabel import is_multilabel, labelled_folder
from vitcli.data.shard_sets import ShardSet, read_split, shard_task, stream_split
from vitcli.errors import VitError
from vitcli.data.specs import SourceSpec

Role = Literal["train", "eval"]
LABEL_NAMES = ("label", "fine_label", "labels", "cls")  # tried in order when the column is not given
EVAL_SPLITS = ("test", "validation", "val", "valid", "eval")
CARVE_FRACTION = 0.1
CARVE_SEED = 0
CARVED = {"train": "90%", "eval": "10%"}  # the split names of the two sides, e.g. train[10%]


@dataclass
class ImageSet:
    """One split of a data set: `dataset` has columns image (encoded Image()) and label (int)."""

    dataset: datasets.Dataset
    num_classes: int
    class_names: list[str]
    name: str
    split: str

    target_column = "label"  # what the loader reads beside the image (a MaskSet's: its masks)

    def __len__(self) -> int:
        return len(self.dataset)

    def target_decoder(self) -> None:
        """Labels need no decoding (a MaskSet's masks do)."""
        return None

    @property
    def multilabel(self) -> bool:
        """Several classes per image: the label column is a Sequence(ClassLabel) (data/multilabel.py)."""
        return is_multilabel(self.dataset.features.get("label"))


def build(cfg: SourceSpec, role: Role, *, img_size: Union[int, tuple[int, int]] = 224, seed: int = 0,
          labels: bool = True, say: Optional[Callable[[str], object]] = None) -> Union[ImageSet, ShardSet, HubSet]:
    """The train or eval split a recipe's data section asks for, subset applied.

    Train subsets follow `seed`; eval subsets always use seed 0 so every run scores the same images.
    The training split of tar shards streams (a ShardSet); every other split is an ImageSet.
    """
    if role == "train" and cfg.imbalance and (is_shard_source(cfg.dataset) or cfg.streaming):
        raise VitError("data.imbalance subsamples a map-style training set; a streamed set streams whole. Drop one of them.")
    if role == "train" and is_shard_source(cfg.dataset):
        if cfg.train_subset:
            raise VitError("data.train_subset picks images of a map-style set; tar shards stream whole. "
                           "Drop it, or write a smaller set of shards (vit shards SRC OUT).")
        return stream_split(cfg.dataset, cfg.train_split, cfg.num_samples)
    if role == "train" and cfg.streaming:
        if cfg.train_subset:
            raise VitError("data.train_subset picks images of a map-style set; a streamed set streams whole. "
                           "Drop one of data.train_subset and data.streaming.")
        return _stream(cfg, labels, say)
    split = cfg.train_split if role == "train" else cfg.eval_split
    subset = cfg.train_subset if role == "train" else cfg.eval_subset
    image_set = load_split(
        cfg.dataset, split, role=role, data_dir=cfg.data_dir, img_size=img_size,
        seed=seed if role == "train" else 0, subset=subset, labels=labels, say=say, label_file=cfg.labels,
    )
    if role == "train" and cfg.imbalance:
        from vitcli.data.balance import long_tail  # balance reads ImageSets: imported here, not at the top

        image_set = long_tail(image_set, cfg.imbalance, seed)
    return image_set


def load_split(
    dataset: str,
    split: Optional[str] = None,
    *,
    role: Role = "train",
    data_dir: Optional[str] = None,
    img_size: Union[int, tuple[int, int]] = 224,
    seed: int = 0,
    subset: Optional[int] = None,
    carve: bool = True,
    labels: bool = True,
    say: Optional[Callable[[str], object]] = None,
    label_file: Optional[str] = None,
) -> ImageSet:
    """Load one split of a named set or local path.

    Args:
        dataset: registry name / alias, or a path (image folder or save_to_disk directory).
        split: split name ("a+b" concatenates); None: the set's own train or eval split for `role`.
        role: which default split to take, and which side of a carved 10% split to return.
        data_dir: a local copy of a *named* set with the Hub schema (folder, snapshot or save_to_disk).
        img_size: image size of the `synthetic` set (ignored otherwise).
        seed: seeds `synthetic` images and the subset.
        subset: keep only this many images (a seeded random choice, kept in data-set order).
        carve: a source with a single split (a folder of class folders) and no `split` asked for: True
            splits it 90% / 10% for training (role picks the side); False takes it whole (`vit eval`
            scores every image of a folder). `split` "NAME[90%]" / "NAME[10%]" asks for a side by name.
        labels: False accepts a set without labels (self-supervised pretraining): num_classes 0.
        say: where the one-line note about indexing a local folder goes (None: nowhere).
        label_file: a CSV or JSON file of each image's labels (a multi-label folder: data/multilabel.py).
    """
    if role not in ("train", "eval"):
        raise ValueError(f"role must be 'train' or 'eval', not {role!r}")
    if data_dir is None and is_shard_source(dataset):
        ds, class_names, split_name = read_split(dataset, split, role, labels)
        image_set = ImageSet(ds, len(class_names), class_names, dataset, split_name)
        return take_subset(image_set, subset, seed) if subset else image_set
    spec, path = resolve_source(dataset, data_dir)
    label = spec.name if spec else str(path)
    if spec is not None and spec.task == "segmentation":
        raise VitError(f"'{spec.name}' is a segmentation set (a mask per image), not a classification one. Train on it "
                       "with task: segmentation (vit finetune --task segmentation, or recipes/segment_digits.yaml).")
    if label_file is not None:
        if path is None or not path.is_dir():
            raise VitError(f"data.labels lists the images of a folder; data.dataset {dataset} is not one.")
        splits = labelled_folder(path, label_file)
    elif spec is not None and spec.builtin:
        split = split or ("train" if role == "train" else spec.eval_split)
        splits = _builtin_splits(spec, split, img_size, seed)
    elif path is not None:
        splits = _local_splits(path, spec, say)
    else:
        assert spec is not None
        name = split or (spec.train_split if role == "train" else spec.eval_split)
        splits = {name: load_hub_split(spec, name)}
        split = name
    splits, class_names = _standardise(splits, spec, label, labels)
    ds, split_name = _pick_split(splits, split, role, spec, label, carve)
    if len(ds) == 0:
        raise VitError(f"Split '{split_name}' of data set '{label}' is empty. Point data.dataset at a set with images.")
    image_set = ImageSet(ds, len(class_names), class_names, label, split_name)
    return take_subset(image_set, subset, seed) if subset else image_set


def _stream(cfg: SourceSpec, labels: bool, say) -> HubSet:
    """The training split streamed: a Hub set through load_dataset(streaming=True); any other source
    (a folder, a save_to_disk copy, a named set's local copy, digits) streams its indexed table."""
    spec, path = resolve_source(cfg.dataset, cfg.data_dir)
    if spec is None or spec.builtin or path is not None:
        return streamed(load_split(cfg.dataset, cfg.train_split, role="train", data_dir=cfg.data_dir, labels=labels, say=say))
    split = cfg.train_split or spec.train_split
    ds = stream_hub_split(spec, split)
    image_col, label_col = _detect_columns(ds.features, spec, spec.name, required=labels)
    ds = ds.select_columns([c for c in (image_col, label_col) if c]).rename_columns(
        {c: n for c, n in ((image_col, "image"), (label_col, "label")) if c and c != n})
    feature = ds.features.get("label") if label_col else None
    names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else [str(i) for i in range(spec.num_classes or 0)]
    total = ds.info.splits[split].num_examples if ds.info.splits and split in ds.info.splits else None
    return streamed(ImageSet(ds, len(names), names, spec.name, split), num_samples=total or cfg.num_samples)


def label_array(ds: datasets.Dataset) -> np.ndarray:
    """A single-label set's class ids, read as one column (no images decoded)."""
    return np.asarray(ds.select_columns(["label"]).with_format("numpy")["label"], dtype=np.int64)


def take_subset(image_set: ImageSet, n: int, seed: int) -> ImageSet:
    """A seeded random choice of n images (all of them when n >= len), kept in data-set order."""
    if n >= len(image_set):
        return image_set
    keep = np.sort(np.random.default_rng(seed).permutation(len(image_set))[:n])
    ds = image_set.dataset.select(keep, keep_in_memory=True)
    return ImageSet(ds, image_set.num_classes, image_set.class_names, image_set.name, f"{image_set.split}[{n}]")


# ---------------------------------------------------------------------------------------------
# Where the data comes from


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or "\\" in name or (lookup(name) is None and "/" in name)


def named_task(dataset: str, data_dir: Optional[str]) -> tuple[Optional[str], Optional[Path]]:
    """(task, None) when the name decides what `dataset` holds: tar shards (their index), a registry set, a
    path that is no folder (task None); (None, folder) when only the folder's contents can tell."""
    if data_dir is None and is_shard_source(dataset):
        return shard_task(dataset)[0], None
    spec, path = resolve_source(dataset, data_dir)
    if path is None or not path.is_dir():
        return (spec.task if spec is not None else None), None
    return None, path


def resolve_source(dataset: str, data_dir: Optional[str]) -> tuple[Optional[DatasetSpec], Optional[Path]]:
    """(spec, local path): a named set has a spec, a local source has a path, a named local copy both."""
    spec = None if _looks_like_path(dataset) else lookup(dataset)
    if spec is None:
        path = Path(dataset).expanduser()
        if not path.exists():
            if _looks_like_path(dataset):
                raise VitError(
                    f"Data set path '{dataset}' does not exist. Check the path, or use a named set: "
                    f"{', '.join(list_datasets())}."
                )
            raise unknown_dataset_error(dataset)
        if data_dir:
            raise VitError(
                f"data.data_dir is only for a named set's local copy; data.dataset is already the path '{dataset}'. "
                "Drop data.data_dir."
            )
        return None, path
    if not data_dir:
        return spec, None
    if spec.builtin:
        raise VitError(f"'{spec.name}' is built in and needs no data.data_dir; drop it.")
    path = Path(data_dir).expanduser()
    if not path.exists():
        raise VitError(f"data.data_dir '{data_dir}' does not exist. Point it at a local copy of {spec.name}.")
    return spec, path


def _builtin_splits(spec: DatasetSpec, split: str, img_size, seed: int) -> dict:
    if spec.name == "digits":
        return dict(builtin.digits_splits())
    if split not in builtin.SYNTHETIC_SIZES:  # build only the split asked for: the other may be large
        raise VitError(f"Data set 'synthetic' has no split '{split}'. Available splits: train, test.")
    size = img_size if isinstance(img_size, int) else max(img_size)
    return {split: builtin.synthetic_split(split, size, seed, spec.num_classes or 1000)}


def _local_splits(path: Path, spec: Optional[DatasetSpec], say=None) -> dict[str, datasets.Dataset]:
    """All splits of a local image folder, Hub snapshot or save_to_disk directory."""
    if not path.is_dir():
        raise VitError(
            f"'{path}' is a file; pass a folder of images (one sub-folder per class) or a save_to_disk directory."
        )
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001
            raise VitError(f"'{path}' looks like a save_to_disk directory but cannot be read: {e}") from e
        if isinstance(loaded, datasets.DatasetDict):
            return dict(loaded)
        return {loaded.split and str(loaded.split) or "train": loaded}
    # A README with configs (a Hub snapshot) needs the config name; a plain folder must not get one.
    config = spec.config if spec is not None and (path / "README.md").exists() else None
    loaded = index_folder(path, config, say)
    return dict(loaded)


# ---------------------------------------------------------------------------------------------
# Columns: exactly `image` and `label`


def _standardise(splits: dict, spec: Optional[DatasetSpec], label: str, labels: bool = True) -> tuple[dict, list[str]]:
    """Rename each split's image / label columns to image / label, drop the rest; class names.

    labels False (self-supervised objectives): a set without a label column gets label 0 everywhere
    and no class names (num_classes 0); a set with one keeps it (few-shot evaluation uses it)."""
    first = next(iter(splits.values()))
    image_col, label_col = _detect_columns(first.features, spec, label, required=labels)
    if label_col is None:
        return {name: _unlabelled(ds, image_col) for name, ds in splits.items()}, []
    out = {}
    for name, ds in splits.items():
        missing = {image_col, label_col} - set(ds.column_names)
        if missing:
            raise VitError(
                f"Split '{name}' of '{label}' lacks column(s) {sorted(missing)}; its columns: {ds.column_names}."
            )
        if ds.column_names != [image_col, label_col]:
            ds = ds.select_columns([image_col, label_col])
        renames = {c: n for c, n in ((image_col, "image"), (label_col, "label")) if c != n}
        if renames:
            ds = ds.rename_columns(renames)
        if not (isinstance(ds.features["image"], datasets.Image) and ds.features["image"].decode):
            ds = ds.cast_column("image", datasets.Image())  # metadata only: the stored bytes stay as they are
        out[name] = ds
    feature = first.features[label_col]
    if isinstance(feature, datasets.ClassLabel):
        return out, list(feature.names)
    if is_multilabel(feature):
        inner = feature.feature if isinstance(feature, datasets.Sequence) else feature[0]
        if isinstance(inner, datasets.ClassLabel):
            return out, list(inner.names)
        raise VitError(f"Column '{label_col}' of '{label}' holds lists of {inner}; multi-label classes must be a "
                       "Sequence(ClassLabel) (cast it with datasets.Sequence(datasets.ClassLabel(names=[...]))).")
    if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
        names = sorted({v for ds in out.values() for v in ds.unique("label")})
        return {n: ds.cast_column("label", datasets.ClassLabel(names=names)) for n, ds in out.items()}, names
    if isinstance(feature, datasets.Value) and "int" in feature.dtype:
        num = spec.num_classes if spec and spec.num_classes else 1 + max(max(ds["label"]) for ds in out.values())
        return out, [str(i) for i in range(num)]
    raise VitError(f"Column '{label_col}' of '{label}' holds {feature}; class labels must be integers or strings.")


def _unlabelled(ds: datasets.Dataset, image_col: str) -> datasets.Dataset:
    ds = ds.select_columns([image_col]).rename_columns({image_col: "image"} if image_col != "image" else {})
    if not (isinstance(ds.features["image"], datasets.Image) and ds.features["image"].decode):
        ds = ds.cast_column("image", datasets.Image())
    return ds.add_column("label", [0] * len(ds), feature=datasets.Value("int64"))


def _detect_columns(features: datasets.Features, spec: Optional[DatasetSpec], label: str,
                    required: bool = True) -> tuple[str, Optional[str]]:
    images = [c for c, f in features.items() if isinstance(f, datasets.Image)]
    if spec is not None and spec.image_column in images:
        image_col = spec.image_column
    elif images:
        image_col = images[0]
    else:
        raise VitError(
            f"Data set '{label}' has no image column (columns: {dict(features)}). It needs a column with the "
            "datasets Image() feature; cast yours with ds.cast_column(NAME, datasets.Image())."
        )
    class_labels = [c for c, f in features.items() if isinstance(f, datasets.ClassLabel) or is_multilabel(f)]
    candidates = ([spec.label_column] if spec is not None else []) + list(LABEL_NAMES)
    found = [c for c in candidates if c in features]
    if found:
        return image_col, found[0]
    if len(class_labels) == 1:
        return image_col, class_labels[0]
    if not required:
        return image_col, None
    if len(features) == 1:
        raise VitError(
            f"'{label}' has images but no labels. Put the images in one sub-folder per class "
            "(e.g. data/cat/1.jpg, data/dog/2.jpg)."
        )
    raise VitError(
        f"Cannot tell which column of '{label}' holds the class labels (columns: {list(features)}). "
        f"Name it one of {', '.join(LABEL_NAMES)}, or make it the only ClassLabel column."
    )


# ---------------------------------------------------------------------------------------------
# Splits


def _pick_split(
    splits: dict[str, datasets.Dataset], split: Optional[str], role: Role, spec: Optional[DatasetSpec], label: str,
    carve: bool = True,
) -> tuple[datasets.Dataset, str]:
    if len(splits) == 1:  # one split only (e.g. a folder of class folders): carve the eval images from it
        (only_name, only), = splits.items()
        sides = {f"{only_name}[{CARVED['train']}]": "train", f"{only_name}[{CARVED['eval']}]": "eval"}
        if split in sides:
            return _carve(only, sides[split]), split
        if split is None and carve:
            return _carve(only, role), f"{only_name}[{CARVED[role]}]"
        if split is None:
            return only, only_name
    if split is not None:
        return _join(splits, split, label), split
    default = None if spec is None else (spec.train_split if role == "train" else spec.eval_split)
    wanted = [default] if default else []
    wanted += ["train"] if role == "train" else list(EVAL_SPLITS)
    for name in wanted:
        if all(part in splits for part in name.split("+")):
            return _join(splits, name, label), name
    raise VitError(
        f"Data set '{label}' has no {'training' if role == 'train' else 'evaluation'} split among "
        f"{', '.join(splits)}. Pick one with --set data.{'train' if role == 'train' else 'eval'}_split=NAME."
    )


def _join(splits: dict[str, datasets.Dataset], split: str, label: str) -> datasets.Dataset:
    parts = split.split("+")
    missing = [p for p in parts if p not in splits]
    if missing:
        carved = f" (and its two carved parts {', '.join(f'{next(iter(splits))}[{c}]' for c in CARVED.values())})" if len(splits) == 1 else ""
        raise VitError(f"Data set '{label}' has no split '{missing[0]}'. Available splits: {', '.join(splits)}{carved}.")
    chosen = [splits[p] for p in parts]
    return chosen[0] if len(chosen) == 1 else datasets.concatenate_datasets(chosen)


def _carve(ds: datasets.Dataset, role: Role) -> datasets.Dataset:
    """The 90% (train) or 10% (eval) side of a fixed, stratified when possible, split."""
    from sklearn.model_selection import train_test_split

    n = len(ds)
    if n < 2:
        raise VitError(f"Only {n} image(s) found: too few to split off evaluation images. Add images.")
    n_eval = max(1, round(CARVE_FRACTION * n))
    index = np.arange(n)
    try:
        if is_multilabel(ds.features["label"]):
            raise ValueError("several classes per image: no stratification")
        train_idx, eval_idx = train_test_split(index, test_size=n_eval, stratify=ds["label"], random_state=CARVE_SEED)
    except ValueError:  # a class with one image, or fewer eval images than classes: no stratification
        train_idx, eval_idx = train_test_split(index, test_size=n_eval, random_state=CARVE_SEED)
    keep = np.sort(train_idx if role == "train" else eval_idx)
    return ds.select(keep, keep_in_memory=True)
