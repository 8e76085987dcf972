"""The WebDataset tar format: samples read from a shard (from any byte offset) and written to one.

A sample is a run of consecutive tar members sharing a key, the member name up to the first dot of its
base name (WebDataset's rule): `KEY.jpg|jpeg|png|webp|...` holds the image as stored, and `KEY.cls` the
class index in ASCII (or `KEY.json` with a "label" or "cls" field, or for a multi-label sample a "labels"
list of class indices); a segmentation sample has its mask as `KEY.seg.png` (or `KEY.mask.png`, or
`KEY.png` beside a `KEY.jpg|jpeg|webp` image) instead of a label; a detection sample has `KEY.json` with
its boxes in the Hugging Face detection schema, {"objects": {"bbox": [[x, y, w, h], ...], "category": [...]}}
(optionally "area" and "iscrowd"), instead of a label. Shards are opened through fsspec,
so a local path and `s3://`, `gs://`, `https://` URLs read alike (remote ones by range requests).

Each sample carries the byte offset of its first member's header: a reader that saved it seeks straight
back to that sample (exact resume, without re-reading a shard from its start). Python's tarfile treats a
header cut short as the end of the archive; `read_samples` checks the bytes after the last member, so a
truncated shard is reported, not silently shortened.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import fsspec

from vitcli.errors import VitError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm")
MASK_EXTS = ("seg.png", "mask.png")  # a segmentation sample's mask member (also KEY.png beside a KEY.jpg)
BLOCK = tarfile.BLOCKSIZE


class ShardError(VitError):
    """A shard that cannot be read on from some point (truncated, not a tar, unreachable)."""

    def __init__(self, url: str, message: str):
        super().__init__(f"Shard {url}: {message}")
        self.url = url


@dataclass
class Sample:
    key: str
    offset: int  # byte offset of the sample's first member header in its shard
    image: Optional[bytes]
    ext: Optional[str]  # the image member's extension ("jpg", "png", ...)
    label: Optional[int | list[int]]  # a class index, or a multi-label sample's list of them
    problem: Optional[str] = None  # why the sample cannot be used (no image, unreadable label)
    end: int = 0  # byte offset where the next sample (or the end of the archive) starts
    mask: Optional[bytes] = None  # a segmentation sample's mask PNG
    objects: Optional[dict] = None  # a detection sample's boxes: {"bbox": [[x, y, w, h]], "category": [c], ...}


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member name: the key runs to the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _label(ext: str, data: bytes) -> int | list[int]:
    if ext == "cls":
        return int(data.decode("ascii").strip())
    value = json.loads(data)
    if isinstance(value, dict) and "labels" in value:  # multi-label: {"labels": [class indices]}
        labels = value["labels"]
        if not isinstance(labels, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
            raise ValueError("'labels' is not a list of class indices")
        return labels
    value = value.get("label", value.get("cls")) if isinstance(value, dict) else value
    if not isinstance(value, int):
        raise ValueError("no integer 'label' or 'cls' field")
    return value


def _finish(key: str, offset: int, members: dict[str, bytes], end: int) -> Sample:
    mask_ext = next((e for e in MASK_EXTS if e in members), None)
    if mask_ext is None and "png" in members and any(e in members for e in ("jpg", "jpeg", "webp")):
        mask_ext = "png"  # KEY.jpg + KEY.png: the image and its mask
    image_ext = next((e for e in members if e in IMAGE_EXTS and e != mask_ext), None)
    label, problem, objects = None, None, None
    label_ext = "cls" if "cls" in members else "json" if "json" in members else None
    if label_ext == "json" and b'"objects"' in members["json"]:
        objects, problem = _objects(key, members["json"])
    elif label_ext is not None:
        try:
            label = _label(label_ext, members[label_ext])
        except (ValueError, UnicodeDecodeError) as e:
            problem = f"its label {key}.{label_ext} is not a class index ({e})"
    if image_ext is None:
        problem = f"it has no image member (found {', '.join(sorted(members)) or 'nothing'}; expected one of .jpg, .png, .webp)"
    return Sample(key, offset, members.get(image_ext) if image_ext else None, image_ext, label, problem, end,
                  members.get(mask_ext) if mask_ext else None, objects)


def _objects(key: str, data: bytes) -> tuple[Optional[dict], Optional[str]]:
    """(a detection sample's objects, or why its KEY.json cannot be used)."""
    try:
        objects = json.loads(data)["objects"]
        boxes, categories = objects["bbox"], objects["category"]
        if len(boxes) != len(categories) or not all(len(b) == 4 for b in boxes):
            raise ValueError("'bbox' must hold one [x, y, w, h] per 'category'")
        return objects, None
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return None, f"its boxes {key}.json are not {{\"objects\": {{\"bbox\": [[x, y, w, h], ...], \"category\": [...]}}}} ({e})"


def open_shard(url: str):
    """A seekable binary file for a local path or any fsspec URL; ShardError when it cannot be opened."""
    try:
        if "://" not in url or url.startswith("file://"):  # local: the plain file is ~2x cheaper per read than fsspec's
            return open(url.removeprefix("file://"), "rb", buffering=1 << 20)
        return fsspec.open(url, "rb").open()
    except FileNotFoundError as e:
        raise ShardError(url, "does not exist (or cannot be reached). Check the path or URL.") from e
    except Exception as e:  # noqa: BLE001 -- any fsspec backend failure: network, credentials, protocol
        raise ShardError(url, f"cannot be opened: {type(e).__name__}: {e}") from e


def read_samples(url: str, start: int = 0, *, limit: Optional[int] = None, file=None) -> Iterator[Sample]:
    """The samples of a shard from byte offset `start` (a member header), `limit` of them at most.

    Raises ShardError where the shard stops being readable (after yielding what came before)."""
    f = file or open_shard(url)
    try:
        f.seek(start)
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            raise ShardError(url, f"is not a tar file, or is cut short at byte {start} ({e}).") from e
        key, offset, members, count = None, 0, {}, 0
        # No yield inside the try: a generator closed at interpreter exit would evaluate the except
        # clause after the tarfile module is gone, and print an ignored TypeError.
        members_of = iter(tar)
        while True:
            try:
                info = next(members_of, None)
                if info is not None and info.isfile():
                    f.seek(info.offset_data)  # the member's bytes, read directly (tarfile's file object costs more)
                    data = f.read(info.size)
            except (tarfile.ReadError, EOFError, OSError) as e:
                raise ShardError(url, f"is cut short or damaged after byte {offset} ({e}).") from e
            if info is None:
                break
            if not info.isfile():
                continue
            k, ext = split_name(info.name)
            if k != key:
                if key is not None:
                    yield _finish(key, offset, members, info.offset)
                    count += 1
                    if limit is not None and count >= limit:
                        return
                key, offset, members = k, info.offset, {}
            members[ext] = data
        _check_end(url, f, tar.offset)
        if key is not None:
            yield _finish(key, offset, members, tar.offset)
    finally:
        if file is None:
            f.close()


def _check_end(url: str, f, end: int) -> None:
    """tarfile stops quietly at a header cut short: what follows the last member must be an end block."""
    f.seek(end)
    rest = f.read(BLOCK)
    if rest and (len(rest) < BLOCK or rest.strip(b"\0")):
        raise ShardError(url, f"is cut short: {len(rest)} stray byte(s) at byte {end} where a member header or the "
                              "end of the archive should be. Rewrite the shard (e.g. with `vit shards`).")


# ---------------------------------------------------------------------------------------------
# Writing


def _member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444  # fixed metadata: the same input writes the same bytes
    tar.addfile(info, io.BytesIO(data))


def tar_size(sizes: list[int]) -> int:
    """Bytes the members of these sizes take in a tar (a header block each, data padded to blocks)."""
    return sum(BLOCK + -(-s // BLOCK) * BLOCK for s in sizes)


def closed_size(members: int) -> int:
    """A tar's size on disk once closed: its members, two zero blocks, padded to whole records."""
    return -(-(members + 2 * BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


class ShardWriter:
    """Writes one shard: samples appended with `add`, then `close()` -> (bytes, sha256).

    The shard is written under a temporary name and renamed when complete, so a shard that exists is whole.
    """

    def __init__(self, path: str):
        self.path, self.partial = path, path + ".partial"
        self.file = open(self.partial, "wb")
        self.tar = tarfile.open(fileobj=self.file, mode="w", format=tarfile.USTAR_FORMAT)
        self.samples = 0

    def add(self, key: str, image: bytes, ext: str, label: Optional[int | list[int]], mask: Optional[bytes] = None,
            objects: Optional[dict] = None) -> None:
        _member(self.tar, f"{key}.{ext}", image)
        if mask is not None:  # segmentation: KEY.seg.png
            _member(self.tar, f"{key}.seg.png", mask)
        if objects is not None:  # detection: KEY.json {"objects": {...}}
            _member(self.tar, f"{key}.json", json.dumps({"objects": objects}).encode("ascii"))
        if isinstance(label, list):  # multi-label: KEY.json {"labels": [...]}
            _member(self.tar, f"{key}.json", json.dumps({"labels": label}).encode("ascii"))
        elif label is not None:
            _member(self.tar, f"{key}.cls", str(label).encode("ascii"))
        self.samples += 1

    def close(self) -> tuple[int, str]:
        self.tar.close()
        self.file.close()
        digest = hashlib.sha256()
        with open(self.partial, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        size = os.path.getsize(self.partial)
        os.replace(self.partial, self.path)
        return size, digest.hexdigest()

    def abort(self) -> None:
        try:
            self.file.close()
        except OSError:  # its buffer could not be flushed (a full disk): the file goes anyway
            pass
        if os.path.exists(self.partial):
            os.remove(self.partial)
