"""Decode once (data.cache: decoded | auto): every image of a split decoded a single time, before its first
batch, into one uint8 buffer that later epochs and evaluations read instead of the encoded files.

- Pixels are stored at the image's own size, in the mode the transform wants ("RGB" or "L"), by the decoder
  the transform's pipeline uses (TorchCodec for the tensor pipeline, PIL for timm's), so batches equal the
  uncached ones bit for bit; crops are then planned on those pixels as before. Both are stored (H, W, C): a
  crop's rows are then contiguous runs, copied at memory speed, and the layout the CPU resize runs in. (The
  tensor pipeline's reduced-size JPEG decode, a saving for decoding every epoch, is not used: crops come from
  full-size pixels.)
- Storage: in memory when the decoded split fits `budget` bytes (data.cache_budget; default a quarter of the
  RAM), else a memory-mapped file under the datasets cache, kept for later runs (resumes decode nothing).
  `auto` caches only what fits in memory. The size is known before decoding, from the image headers.
- The file's name is a hash of what the pixels come from: the split's fingerprint, the decoder and mode, and
  every image file's path, size and modification time, so an edited image makes a new file.
- An image that cannot be decoded is stored empty; the loader then decodes it as usual, which reports or
  skips it as data.bad_images says.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import datasets
import numpy as np
import pyarrow.compute as pc
from PIL import Image

from vitcli.data.decode import decode_host, encoded_bytes
from vitcli.data.specs import CacheSpec
from vitcli.data.tensor_transforms import TensorTransform
from vitcli.data.transforms import ToMode
from vitcli.errors import path_error

CHUNK = 256  # images decoded per round (in threads: the decoders release the GIL)


class DecodedImages:
    """The decoded pixels of a split: image i starts at `pixels[offsets[i]]`, shaped `shapes[i]` (H, W, C);
    None for an image that could not be decoded (shape 0)."""

    def __init__(self, pixels: np.ndarray, offsets: np.ndarray, shapes: np.ndarray, stored: str):
        self.pixels, self.offsets, self.shapes, self.stored = pixels, offsets, shapes, stored

    def __len__(self) -> int:
        return len(self.shapes)

    @property
    def nbytes(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int) -> Optional[np.ndarray]:
        shape = self.shapes[index]
        if not shape.all():
            return None
        start = int(self.offsets[index])
        return self.pixels[start:start + int(shape.prod())].reshape(tuple(shape))


def tensor_decoder(mode: str) -> Callable[[dict], np.ndarray]:
    """The tensor pipeline's host decoder, its (C, H, W) seen as uint8 (H, W, C) (the copy into the store
    makes it contiguous)."""
    return lambda cell: decode_host(encoded_bytes(cell), mode).numpy().transpose(1, 2, 0)


def pil_decoder(mode: str) -> Callable[[dict], np.ndarray]:
    """The PIL pipeline's decoder (datasets' own, EXIF rotation applied), converted to `mode`: uint8 (H, W, C)."""
    decode = datasets.Image().decode_example

    def pixels(cell: dict) -> np.ndarray:
        image = decode(cell)
        array = np.asarray(image if image.mode == mode else image.convert(mode))
        return array.reshape(array.shape[0], array.shape[1], -1)
    return pixels


def _header_bytes(cell: dict, channels: int) -> int:
    """Decoded size from the image's header alone; 0 when it cannot be read (decoded later, and reported)."""
    try:
        source = io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else cell["path"]
        with Image.open(source) as image:
            width, height = image.size
        return width * height * channels
    except Exception:  # noqa: BLE001 -- an unreadable image is the loader's to report, by data.bad_images
        return 0


def _image_cells(hf: datasets.Dataset, indices: range) -> list[dict]:
    return hf[indices.start:indices.stop]["image"]


def decoded_sizes(hf: datasets.Dataset, channels: int) -> np.ndarray:
    """Bytes each image of `hf` (its image column not decoded) takes decoded, from the headers."""
    sizes = np.zeros(len(hf), dtype=np.int64)
    for start in range(0, len(hf), CHUNK):
        cells = _image_cells(hf, range(start, min(start + CHUNK, len(hf))))
        sizes[start:start + len(cells)] = [_header_bytes(cell, channels) for cell in cells]
    return sizes


def cache_key(hf: datasets.Dataset, kind: str, mode: str) -> str:
    """A hash of where the pixels come from: the split's fingerprint, decoder and mode, and each image file's
    path, size and modification time (cells that hold their bytes are covered by the fingerprint)."""
    digest = hashlib.sha256(f"{hf._fingerprint}|{len(hf)}|{kind}|{mode}|hwc".encode())
    column = hf.data.column("image")
    paths = pc.struct_field(column, "path").to_pylist()
    stored = pc.is_valid(pc.struct_field(column, "bytes")).to_pylist()
    for path, has_bytes in zip(paths, stored):
        if path and not has_bytes:
            stat = os.stat(path)
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:32]


def cache_root() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE).expanduser() / "vitcli-decoded"


def _fill(hf: datasets.Dataset, decode: Callable[[dict], np.ndarray], pixels: np.ndarray, offsets: np.ndarray,
          shapes: np.ndarray) -> None:
    """Decode every image into its slot. One that fails, or whose size differs from its header's, keeps the
    shape (0, 0, 0): the loader decodes it again and reports it."""
    def one(item: tuple[int, dict]) -> None:
        i, cell = item
        start, end = offsets[i], offsets[i + 1]
        try:
            array = decode(cell) if end > start else None
        except Exception:  # noqa: BLE001 -- see above
            array = None
        if array is not None and array.size == end - start:
            pixels[start:end] = array.reshape(-1)
            shapes[i] = array.shape

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for start in range(0, len(hf), CHUNK):
            cells = _image_cells(hf, range(start, min(start + CHUNK, len(hf))))
            list(pool.map(one, zip(range(start, start + len(cells)), cells)))


def _decoded(hf: datasets.Dataset, decode: Callable[[dict], np.ndarray], sizes: np.ndarray,
             pixels: np.ndarray, stored: str) -> DecodedImages:
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    shapes = np.zeros((len(sizes), 3), dtype=np.int64)
    _fill(hf, decode, pixels, offsets, shapes)
    return DecodedImages(pixels, offsets, shapes, stored)


def _mapped(hf: datasets.Dataset, decode: Callable[[dict], np.ndarray], sizes: np.ndarray, key: str) -> DecodedImages:
    """The memory-mapped store for `key`, decoded now unless an earlier run left it complete. Written in a
    temporary folder renamed into place, so an interrupted decode leaves nothing half-made."""
    folder = cache_root() / key
    if not (folder / "index.npz").exists():
        cache_root().mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=cache_root()))
        try:
            pixels = np.lib.format.open_memmap(work / "pixels.npy", mode="w+", dtype=np.uint8, shape=(max(1, int(sizes.sum())),))
            made = _decoded(hf, decode, sizes, pixels, "mapped")
            pixels.flush()
            del pixels
            np.savez(work / "index.npz", offsets=made.offsets, shapes=made.shapes)
            os.replace(work, folder)
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):  # those: another process finished the same store first
                raise path_error(e, e.filename or cache_root(), "the decoded-image cache (data.cache)") from e
        finally:
            shutil.rmtree(work, ignore_errors=True)
    index = np.load(folder / "index.npz")
    return DecodedImages(np.load(folder / "pixels.npy", mmap_mode="r"), index["offsets"], index["shapes"], "mapped")


def decode_split(hf: datasets.Dataset, kind: str, mode: str, spec: CacheSpec) -> Optional[DecodedImages]:
    """The split's decoded images as `spec` says (None: not cached). `hf` has an undecoded image column;
    `kind` is the pipeline's decoder, "tensor" or "pil"."""
    if spec.cache == "none" or len(hf) == 0:
        return None
    decode = tensor_decoder(mode) if kind == "tensor" else pil_decoder(mode)
    sizes = decoded_sizes(hf, 1 if mode == "L" else 3)
    if sizes.sum() <= spec.budget_bytes():
        return _decoded(hf, decode, sizes, np.empty(max(1, int(sizes.sum())), dtype=np.uint8), "memory")
    if spec.cache == "auto":
        return None
    return _mapped(hf, decode, sizes, cache_key(hf, kind, mode))


def cache_pipeline(transform: Callable) -> Optional[tuple[str, str]]:
    """(decoder kind, mode) the decoded cache must use to give `transform` the pixels it would decode itself;
    None for a transform of unknown mode (not cached)."""
    if isinstance(transform, TensorTransform):
        return "tensor", transform.mode
    mode = getattr(transform, "mode", None)  # the joint transforms (segmentation, detection) convert to it
    steps = getattr(transform, "transforms", None)
    if mode is None and steps and isinstance(steps[0], ToMode):
        mode = steps[0].mode
    return ("pil", mode) if mode in ("RGB", "L") else None


def decode_for(hf: datasets.Dataset, transform: Callable, spec: CacheSpec) -> tuple[Optional[DecodedImages], str]:
    """The split's pixels for `transform`'s pipeline as data.cache says, and a line saying what was done."""
    if spec.cache == "none":
        return None, ""
    pipeline = cache_pipeline(transform)
    if pipeline is None:
        return None, f"data.cache {spec.cache}: this transform's images are decoded every time (it takes no single mode)."
    decoded = decode_split(hf.cast_column("image", datasets.Image(decode=False)), *pipeline, spec)
    if decoded is None:
        return None, (f"data.cache auto: {len(hf):,} images would not fit data.cache_budget "
                      f"({spec.budget_bytes() / 2**20:,.0f} MiB) decoded; decoding them every time.")
    where = "in memory" if decoded.stored == "memory" else f"memory-mapped under {cache_root()}"
    return decoded, f"data.cache {spec.cache}: {len(hf):,} images decoded once ({decoded.nbytes / 2**20:,.1f} MiB, {where})."
