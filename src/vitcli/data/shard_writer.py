"""`vit shards`: any data set vitcli reads, written to WebDataset tar shards with a JSON index.

Images are stored as they are (the source's own JPEG / PNG bytes; no re-encode) unless `max_size` asks
for smaller ones. A split's samples go to `SPLIT-000000.tar`, `SPLIT-000001.tar`, ..., each shard closed at
`shard_bytes` or `samples_per_shard`. The training split is written in a seeded random order (an image
folder lists its images class by class, and a stream shuffles only within its buffer: shards of one
class each would train badly); other splits keep the data set's order. A sample's key is its row in the
source split, so every sample can be traced back. every shard is written under a
temporary name and renamed when whole, and the index comes last, so a folder with an index is complete.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import datasets
import numpy as np
from PIL import Image

from vitcli.data.balance import class_counts
from vitcli.data.boxes import BoxSet, has_masks, object_columns
from vitcli.data.det_sources import is_detection_source, load_box_split
from vitcli.data.masks import MaskSet
from vitcli.data.seg_sources import is_segmentation_source, load_mask_split
from vitcli.data.shard_index import write_index
from vitcli.data.sources import ImageSet, load_split
from vitcli.data.tarshards import ShardWriter, closed_size, tar_size
from vitcli.errors import VitError, path_error

PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif", "PPM": "ppm"}
SPLIT_NAMES = {"train[90%]": "train", "train[10%]": "test"}  # a single-split folder's carved sides, as shard splits


@dataclass
class ShardPlan:
    shard_bytes: Optional[int] = 256 * 10**6
    samples_per_shard: Optional[int] = None
    max_size: Optional[int] = None  # longest image side; larger images are downsized (re-encoded)
    shuffle_seed: Optional[int] = 0  # the training split's write order; None: the data set's order


def parse_size(text: str) -> int:
    """'256MB' / '1GB' / '500k' / '1048576' -> bytes (decimal units, as `du --si` and object stores count)."""
    units = {"": 1, "B": 1, "K": 10**3, "KB": 10**3, "M": 10**6, "MB": 10**6, "G": 10**9, "GB": 10**9}
    t = text.strip().upper().replace(" ", "")
    number = t.rstrip("KMGB")
    try:
        value = float(number) * units[t[len(number):]]
    except (ValueError, KeyError):
        raise VitError(f"--shard-size {text!r} is not a size. Write e.g. 256MB, 1GB or 500KB.") from None
    if value < 10 * 1024:
        raise VitError(f"--shard-size {text} is too small for a tar shard; use at least 10KB (256MB is typical).")
    return int(value)


def write_shards(src: str, out: Path, plan: ShardPlan, *, splits: Optional[list[str]] = None,
                 say: Callable[[str], object] = print, label_file: Optional[str] = None) -> dict:
    """Write the splits of `src` (default: the ones training reads, train and eval) as shards in `out`;
    `label_file`: a multi-label folder's labels file (data/multilabel.py)."""
    chosen = _splits(src, splits, say, label_file)
    names = [name for name, _ in chosen]
    written, classes = {}, chosen[0][1].class_names
    counts = {name: class_counts(s).tolist() for name, s in chosen
              if s.num_classes > 0 and not s.multilabel and not isinstance(s, (MaskSet, BoxSet))}
    first = chosen[0][1]
    task = ({"task": "segmentation", "reduce_zero_label": first.reduce_zero_label} if isinstance(first, MaskSet)
            else {"task": "detection", "instance_masks": has_masks(first.dataset)} if isinstance(first, BoxSet) else None)
    if task and plan.max_size:
        raise VitError(f"--max-size re-encodes images smaller; a {task['task']} set's {'masks' if isinstance(first, MaskSet) else 'boxes'} "
                       "would no longer fit them. Drop it.")
    try:
        for name, image_set in chosen:
            shuffle = plan.shuffle_seed is not None and name == "train"
            with _progress(len(image_set), f"writing {name} shards", say) as advance:
                written[name] = _write_split(image_set, out, name, plan, shuffle, advance, done=written)
            total = sum(s["bytes"] for s in written[name])
            say(f"{name}: {len(image_set):,} images -> {len(written[name])} shard(s), {total / 1e6:,.1f} MB")
        index = write_index(str(out), src, list(classes), written, multilabel=first.multilabel, class_counts=counts, task=task)
    except BaseException:  # a full disk, Ctrl-C: shards without their index are no set; leave none behind
        for shard in (s for shards in written.values() for s in shards):
            (out / shard["name"]).unlink(missing_ok=True)
        raise
    return {"index": index, "splits": {n: {"samples": sum(s["samples"] for s in written[n]), "shards": len(written[n])}
                                       for n in names}}


def _splits(src: str, wanted: Optional[list[str]], say, label_file: Optional[str] = None
            ) -> list[tuple[str, ImageSet | MaskSet | BoxSet]]:
    # images with masks (KEY.seg.png beside each image) or boxes (KEY.json)
    for is_kind, load in ((is_segmentation_source, load_mask_split), (is_detection_source, load_box_split)):
        if is_kind(src):
            if wanted:
                return [(w, load(src, w, carve=False, say=say)) for w in wanted]
            sides = [load(src, None, role=role, say=say) for role in ("train", "eval")]
            return [(SPLIT_NAMES.get(s.split, s.split), s) for s in sides]
    if wanted:
        return [(w, load_split(src, w, carve=False, labels=False, say=say, label_file=label_file)) for w in wanted]
    train = load_split(src, None, role="train", labels=False, say=say, label_file=label_file)
    evals = load_split(src, None, role="eval", labels=False, label_file=label_file)
    return [(SPLIT_NAMES.get(s.split, s.split), s) for s in (train, evals)]


@contextlib.contextmanager
def _progress(total: int, text: str, say: Callable[[str], object]) -> Iterator[Callable[[], None]]:
    """advance() once an image: a progress bar on a terminal, else (for splits of 10,000 images or more) a
    line at every tenth of the split, so a long conversion in a log shows it is alive."""
    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn(text), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(text, total=total)
            yield lambda: bar.advance(task)
        return
    done = [0]
    step = max(1, total // 10)

    def advance() -> None:
        done[0] += 1
        if total >= 10_000 and done[0] % step == 0 and done[0] < total:
            say(f"{text}: {done[0]:,} / {total:,} images")
    yield advance


def _write_split(image_set: ImageSet, out: Path, split: str, plan: ShardPlan, shuffle: bool,
                 advance: Callable[[], None] = lambda: None, *, done: dict[str, list[dict]]) -> list[dict]:
    """The split's shards; each closed one is also listed in done[split] at once (removed if a later one fails)."""
    ds = image_set.dataset.cast_column("image", datasets.Image(decode=False))
    masked, boxed = isinstance(image_set, MaskSet), isinstance(image_set, BoxSet)
    if masked:
        ds = ds.cast_column("mask", datasets.Image(decode=False))
    order = np.random.default_rng(plan.shuffle_seed).permutation(len(ds)) if shuffle else np.arange(len(ds))
    labelled, multilabel = image_set.num_classes > 0 and not (masked or boxed), image_set.multilabel
    shards: list[dict] = done.setdefault(split, [])
    writer: Optional[ShardWriter] = None
    size = 0
    try:
        for i in order.tolist():
            row = ds[i]
            data, ext = _image_bytes(row["image"], image_set, i, plan.max_size)
            label = (list(row["label"]) if multilabel else int(row["label"])) if labelled else None
            mask = _stored(row["mask"]) if masked else None
            objects = object_columns(row["objects"]) if boxed else None
            member = tar_size([len(data)] + ([len(str(label)) + 16] if labelled else []) + ([len(mask)] if masked else [])
                              + ([len(json.dumps({"objects": objects})) + 1] if boxed else []))
            if writer is not None and _full(writer.samples, size + member, plan):
                shards.append(_close(writer))
                writer = None
            if writer is None:
                name = f"{split}-{len(shards):06d}.tar"
                writer, size = ShardWriter(str(out / name)), 0
            writer.add(f"{i:09d}", data, ext, label, mask=mask, objects=objects)
            size += member
            advance()
        if writer is not None:
            shards.append(_close(writer))
    except BaseException as e:
        if writer is not None:
            writer.abort()
        if isinstance(e, OSError):
            raise path_error(e, Path(e.filename or out), "the shards") from e
        raise
    return shards


def _stored(cell: dict) -> bytes:
    """A cell's encoded bytes as stored (a mask is never re-encoded)."""
    return cell["bytes"] if cell.get("bytes") is not None else Path(cell["path"]).read_bytes()


def _full(samples: int, size_after: int, plan: ShardPlan) -> bool:
    if plan.samples_per_shard is not None:
        return samples >= plan.samples_per_shard
    return closed_size(size_after) > plan.shard_bytes


def _close(writer: ShardWriter) -> dict:
    size, sha = writer.close()
    return {"name": Path(writer.path).name, "samples": writer.samples, "bytes": size, "sha256": sha}


def _image_bytes(cell: dict, image_set: ImageSet, i: int, max_size: Optional[int]) -> tuple[bytes, str]:
    """The stored bytes of an image and its extension; downsized and re-encoded only above max_size."""
    data, path = cell.get("bytes"), cell.get("path")
    try:
        if data is None:
            data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or "PNG"
            if max_size and max(img.size) > max_size:
                img.thumbnail((max_size, max_size), Image.BICUBIC)
                buf = io.BytesIO()
                keep = img if fmt in ("JPEG", "PNG", "WEBP") else img.convert("RGB")
                keep.save(buf, format=fmt if fmt in ("JPEG", "PNG", "WEBP") else "PNG",
                          **({"quality": 95} if fmt == "JPEG" else {}))
                data, fmt = buf.getvalue(), fmt if fmt in ("JPEG", "PNG", "WEBP") else "PNG"
    except Exception as e:  # noqa: BLE001 -- any decoder failure: name the image
        where = f" ({path})" if path else ""
        raise VitError(f"Image {i} of '{image_set.name}' split '{image_set.split}'{where} cannot be read: {e}. "
                       "Replace or delete it, then run vit shards again.") from e
    return data, PIL_EXT.get(fmt, fmt.lower())
