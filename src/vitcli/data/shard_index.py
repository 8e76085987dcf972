"""Which tar shards make a data set: the JSON index `vit shards` writes, or explicit patterns.

`index.json`, beside the shards (names are relative to its folder, which may be a URL):

    {"format": "vitcli-shards", "version": 1, "source": "digits", "classes": ["0", "1", ...],
     "splits": {"train": {"num_samples": 1437, "class_counts": [142, 146, ...], "shards": [
                    {"name": "train-000000.tar", "samples": 100, "bytes": 389120, "sha256": "..."}, ...]},
                "test": {...}}}

`data.dataset` names shards as a folder or URL holding `index.json` (or the index file itself), or as
patterns: brace ranges (`/data/train-{000000..001023}.tar`), globs (`/data/train-*.tar`) or several
patterns joined by `::`. Patterns carry no counts and no class names: `data.num_samples` (or
`train.steps`) and `model.num_classes` then say what the index would.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Optional

import fsspec

from vitcli.errors import VitError
from vitcli.io.paths import write_text

INDEX_NAME = "index.json"
FORMAT = "vitcli-shards"
VERSION = 1
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


@dataclass
class ShardInfo:
    url: str
    samples: Optional[int] = None
    bytes: Optional[int] = None
    sha256: Optional[str] = None


@dataclass
class ShardSplit:
    name: str
    shards: list[ShardInfo]
    class_counts: Optional[list[int]] = None  # samples per class (single-label splits written by `vit shards`)

    @property
    def num_samples(self) -> Optional[int]:
        counts = [s.samples for s in self.shards]
        return None if any(c is None for c in counts) else sum(counts)


@dataclass
class ShardIndex:
    location: str  # the index file or the patterns, for messages
    splits: dict[str, ShardSplit]
    classes: list[str] = field(default_factory=list)
    source: Optional[str] = None
    multilabel: bool = False  # samples carry lists of classes (KEY.json {"labels": [...]})
    task: str = "classification"  # segmentation: samples carry masks (KEY.seg.png); detection: boxes (KEY.json)
    reduce_zero_label: bool = False  # segmentation masks whose 0 is ignored (ADE20K)
    instance_masks: bool = False  # detection objects carry masks (segmentation: compressed RLE counts)


def is_shard_source(dataset: str) -> bool:
    """Whether data.dataset names tar shards (a pattern, a .tar, or a folder / URL with an index.json)."""
    if ".tar" in dataset or _RANGE.search(dataset) or dataset.rstrip("/").endswith(INDEX_NAME):
        return True
    try:
        fs, path = fsspec.core.url_to_fs(dataset)
        return fs.isfile(_join(path, INDEX_NAME))
    except Exception:  # noqa: BLE001 -- not a place fsspec can look into: not shards
        return False


def _join(folder: str, name: str) -> str:
    return folder.rstrip("/") + "/" + name


def load_index(dataset: str) -> ShardIndex:
    """The shards data.dataset names, by index or by pattern (the pattern's shards form split 'train')."""
    if ".tar" in dataset or _RANGE.search(dataset):
        return ShardIndex(dataset, {"train": ShardSplit("train", [ShardInfo(u) for u in expand(dataset)])})
    index_url = dataset if dataset.rstrip("/").endswith(INDEX_NAME) else _join(dataset, INDEX_NAME)
    folder = index_url.rstrip("/")[: -len(INDEX_NAME)].rstrip("/")
    try:
        with fsspec.open(index_url, "rt") as f:
            raw = json.load(f)
    except FileNotFoundError as e:
        raise VitError(f"No shard index at {index_url}. Write shards with `vit shards SRC OUT`, or name them by pattern "
                       "(e.g. /data/train-{000000..000099}.tar).") from e
    except (OSError, ValueError) as e:
        raise VitError(f"The shard index {index_url} cannot be read: {e}. Rewrite it with `vit shards`.") from e
    if raw.get("format") != FORMAT or not isinstance(raw.get("splits"), dict):
        raise VitError(f"{index_url} is not a vitcli shard index (no \"format\": \"{FORMAT}\"). Write shards with `vit shards`.")
    splits = {}
    for name, split in raw["splits"].items():
        shards = [ShardInfo(_join(folder, s["name"]), s.get("samples"), s.get("bytes"), s.get("sha256"))
                  for s in split.get("shards", [])]
        splits[name] = ShardSplit(name, shards, split.get("class_counts"))
    return ShardIndex(index_url, splits, list(raw.get("classes") or []), raw.get("source"), bool(raw.get("multilabel")),
                      str(raw.get("task") or "classification"), bool(raw.get("reduce_zero_label")),
                      bool(raw.get("instance_masks")))


def expand(patterns: str) -> list[str]:
    """The shard URLs of `::`-joined patterns: brace ranges expanded (zero padding kept), then globs."""
    urls: list[str] = []
    for pattern in patterns.split("::"):
        for name in _ranges(pattern):
            if any(c in name for c in "*?["):
                fs, path = fsspec.core.url_to_fs(name)
                protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
                found = sorted(fs.glob(path))
                urls += found if protocol == "file" else [f"{protocol}://{p}" for p in found]
            else:
                urls.append(name)
    if not urls:
        raise VitError(f"The shard pattern {patterns} matches no file. Check the folder and the pattern.")
    return urls


def _ranges(pattern: str) -> list[str]:
    match = _RANGE.search(pattern)
    if match is None:
        return [pattern]
    lo, hi = match.group(1), match.group(2)
    if int(hi) < int(lo):
        raise VitError(f"The range {{{lo}..{hi}}} in {pattern} runs backwards. Write {{{hi}..{lo}}}.")
    width = len(lo)
    head, tail = pattern[: match.start()], pattern[match.end():]
    return [n for i in range(int(lo), int(hi) + 1) for n in _ranges(f"{head}{i:0{width}d}{tail}")]


def write_index(folder: str, source: str, classes: list[str], splits: dict[str, list[dict]], multilabel: bool = False,
                class_counts: Optional[dict[str, list[int]]] = None, task: Optional[dict] = None) -> str:
    """index.json in folder (written whole, then renamed into place); returns its path. `class_counts`: per
    split, its samples per class (what class-balanced loss weights of a streamed split are computed from).
    `task`: what other than labels the samples hold and its settings, e.g. {"task": "segmentation",
    "reduce_zero_label": False} or {"task": "detection"} (None: classification)."""
    counts = class_counts or {}
    body = {"format": FORMAT, "version": VERSION, "source": source, "classes": classes, **({"multilabel": True} if multilabel else {}),
            **(task or {}),
            "splits": {name: {"num_samples": sum(s["samples"] for s in shards),
                              **({"class_counts": counts[name]} if name in counts else {}), "shards": shards}
                       for name, shards in splits.items()}}
    return str(write_text(f"{folder}/{INDEX_NAME}", json.dumps(body, indent=1) + "\n", "the shard index"))
