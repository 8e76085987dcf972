"""Data sets in tar shards: the training split streams (a ShardSet: labels, masks or boxes); any other split
is read whole.

Evaluation stays map-style: an evaluation split (and any split `vit eval` or `vit shards` asks for) is
read once from its shards into an Arrow table in the datasets cache, keyed by the shards' URLs, sizes and
checksums, so evaluation, few-shot scoring and `vit eval` work on it as on any set. Evaluation splits
are small beside training ones (ImageNet's 50,000 validation images: 6.4 GB).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Optional

import datasets

from vitcli.data.boxes import decode_objects, objects_feature
from vitcli.data.indexing import quiet_bars
from vitcli.data.masks import decode_mask
from vitcli.data.sample_stream import SampleTarget, StreamedSet
from vitcli.data.shard_index import ShardIndex, ShardSplit, load_index
from vitcli.data.tarshards import Sample, ShardError, open_shard, read_samples
from vitcli.errors import VitError

EVAL_SPLITS = ("test", "validation", "val", "valid", "eval")


@dataclass
class ShardSet(StreamedSet):
    """A training split read as a stream of tar shards (see data.shard_stream)."""

    urls: list[str] = field(kw_only=True)
    multilabel: bool = field(default=False, kw_only=True)  # samples carry lists of classes: multi-hot targets
    task: str = field(default="classification", kw_only=True)  # segmentation: samples carry masks; detection: objects
    reduce_zero_label: bool = field(default=False, kw_only=True)
    instance_masks: bool = field(default=False, kw_only=True)  # detection: objects carry masks

    def sample_target(self) -> Optional[SampleTarget]:
        """What a dense task's samples carry beside their images (None: a label)."""
        if self.task == "segmentation":
            return SampleTarget(_mask_cell, functools.partial(decode_mask, reduce_zero_label=self.reduce_zero_label),
                                "it has no mask (KEY.seg.png)")
        if self.task == "detection":
            return SampleTarget(functools.partial(_objects_cell, masks=self.instance_masks), decode_objects,
                                "it has no boxes (KEY.json with objects)")
        return None


def _mask_cell(sample: Sample, where: str) -> Optional[dict]:
    return None if sample.mask is None else {"bytes": sample.mask, "path": f"{where} (mask)"}


def _objects_cell(sample: Sample, where: str, masks: bool) -> Optional[dict]:
    """A sample's KEY.json objects in the schema's column form: areas (the boxes') and crowd flags (0) where
    the file leaves them out, and with `masks` a counts string per object ("" where it has none)."""
    o = sample.objects
    if o is None:
        return None
    area = o.get("area") or [w * h for _, _, w, h in o["bbox"]]
    objects = {"bbox": o["bbox"], "category": o["category"], "area": area, "iscrowd": o.get("iscrowd") or [0] * len(area)}
    if masks:
        objects["segmentation"] = o.get("segmentation") or [""] * len(area)
    return objects


def shard_split(index: ShardIndex, split: Optional[str], role: str) -> ShardSplit:
    """The split asked for, or the index's training / first evaluation split."""
    if split is None:
        wanted = ["train"] if role == "train" else list(EVAL_SPLITS)
        split = next((w for w in wanted if w in index.splits), None)
        if split is None:
            what = "training" if role == "train" else "evaluation"
            raise VitError(f"The shards at {index.location} have no {what} split among {', '.join(index.splits) or 'none'}. "
                           f"Pick one with --set data.{'train' if role == 'train' else 'eval'}_split=NAME.")
    if split not in index.splits:
        raise VitError(f"The shards at {index.location} have no split '{split}'. Available splits: {', '.join(index.splits)}.")
    found = index.splits[split]
    if not found.shards:
        raise VitError(f"Split '{split}' of the shards at {index.location} has no shards. Write them again with `vit shards`.")
    return found


def stream_split(dataset: str, split: Optional[str], num_samples: Optional[int] = None) -> ShardSet:
    """The training split of the shards `dataset` names, to stream."""
    index = load_index(dataset)
    found = shard_split(index, split, "train")
    return ShardSet(found.num_samples or num_samples, len(index.classes), list(index.classes), index.location, found.name,
                    urls=[s.url for s in found.shards], multilabel=index.multilabel, class_counts=found.class_counts,
                    task=index.task, reduce_zero_label=index.reduce_zero_label, instance_masks=index.instance_masks)


def check_shards(dataset: str, split: Optional[str]) -> None:
    """Fail fast, before a run starts: the training split's index or pattern resolves and its first shard opens."""
    found = shard_split(load_index(dataset), split, "train")
    try:
        open_shard(found.shards[0].url).close()
    except ShardError as e:
        raise VitError(str(e)) from e


def read_split(dataset: str, split: Optional[str], role: str, labels: bool = True) -> tuple[datasets.Dataset, list[str], str]:
    """(image/label Dataset, class names, split name): a split of the shards read whole into the cache
    (a segmentation split: image/mask; a detection split: image/objects, the HF detection schema)."""
    index = load_index(dataset)
    if split is not None and (".tar" in split or "{" in split):  # an evaluation split given by its own pattern
        index, split = load_index(split), "train"
    found = shard_split(index, split, role)
    ds = _table(found, index, labels)
    names = list(index.classes) or [str(i) for i in range(int(max(ds["label"], default=-1)) + 1)]  # classification only
    return ds, names, found.name


def _table(found: ShardSplit, index: ShardIndex, labels: bool) -> datasets.Dataset:
    keys = [[s.url, s.bytes or 0, s.sha256 or ""] for s in found.shards]  # the cache key: new shards, new table
    label = datasets.Sequence(datasets.ClassLabel(names=index.classes)) if index.multilabel else datasets.Value("int64")
    rows, target = {"segmentation": (_mask_rows, {"mask": datasets.Image()}),
                    "detection": (_object_rows, {"objects": objects_feature(index.instance_masks)})}.get(index.task, (_rows, {"label": label}))
    features = datasets.Features({"image": datasets.Image(), **target})
    kwargs = {"keys": keys, **({"labels": labels, "multilabel": index.multilabel} if rows is _rows else {}),
              **({"masks": index.instance_masks} if rows is _object_rows else {})}
    try:
        with quiet_bars():
            return datasets.Dataset.from_generator(rows, features=features, gen_kwargs=kwargs, split=datasets.NamedSplit(found.name))
    except Exception as e:  # noqa: BLE001 -- datasets wraps the generator's errors; show ours
        cause = e
        while cause.__cause__ is not None and not isinstance(cause, (VitError, ShardError)):
            cause = cause.__cause__
        if isinstance(cause, (VitError, ShardError)):
            raise VitError(f"{cause} Rewrite the shard (vit shards) or leave it out of the split.") from e
        raise


def _rows(keys: list[list], labels: bool, multilabel: bool):
    empty = [] if multilabel else 0
    for url, _, _ in keys:
        for s in read_samples(url):
            if s.problem or (labels and s.label is None):
                raise VitError(f"Sample {s.key} of shard {url} cannot be used: {s.problem or 'it has no label (.cls or .json)'}.")
            yield {"image": {"bytes": s.image, "path": f"{url}:{s.key}"}, "label": s.label if s.label is not None else empty}


def _mask_rows(keys: list[list]):
    for url, _, _ in keys:
        for s in read_samples(url):
            if s.problem or s.mask is None:
                raise VitError(f"Sample {s.key} of shard {url} cannot be used: {s.problem or 'it has no mask (KEY.seg.png)'}.")
            yield {"image": {"bytes": s.image, "path": f"{url}:{s.key}"}, "mask": {"bytes": s.mask, "path": f"{url}:{s.key}.seg.png"}}


def _object_rows(keys: list[list], masks: bool):
    for url, _, _ in keys:
        for s in read_samples(url):
            if s.problem or s.objects is None:
                raise VitError(f"Sample {s.key} of shard {url} cannot be used: {s.problem or 'it has no boxes (KEY.json with objects)'}.")
            yield {"image": {"bytes": s.image, "path": f"{url}:{s.key}"}, "objects": _objects_cell(s, url, masks)}


def shard_task(dataset: str) -> tuple[str, bool]:
    """(what the shards hold, whether their masks' 0 is ignored), from their index."""
    index = load_index(dataset)
    return index.task, index.reduce_zero_label


def labelled_cells(shards: ShardSet) -> Iterator[tuple[dict, int]]:
    """(encoded image cell, label) of the split's usable labelled samples, shard after shard in index order."""
    for url in shards.urls:
        for s in read_samples(url):
            if not s.problem and s.label is not None:
                yield {"bytes": s.image, "path": f"{url}:{s.key}"}, s.label
