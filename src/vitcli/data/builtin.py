"""The two data sets that need no download: scikit-learn's digits and random synthetic images.

Both are built in memory as `datasets.Dataset`s with encoded images (PNG / JPEG bytes in an `Image()`
column), exactly like a Hub set, so everything downstream takes one path. Both are cached per process.
"""

from __future__ import annotations

import io
from functools import lru_cache

import datasets
import numpy as np
from PIL import Image

from vitcli.data.boxes import objects_feature
from vitcli.data.instance_masks import encode_masks

DIGITS_CLASSES = [str(i) for i in range(10)]
SYNTHETIC_SIZES = {"train": 1024, "test": 256}


def _features(class_names: list[str]) -> datasets.Features:
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})


def _encode(array: np.ndarray, fmt: str, **kwargs) -> dict:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return {"bytes": buf.getvalue(), "path": None}


def _digit_pixels() -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(8x8 uint8 images, labels, {"train": indices, "test": indices}) of scikit-learn's digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    pixels = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    train_idx, test_idx = train_test_split(np.arange(len(bunch.target)), test_size=0.2, stratify=bunch.target, random_state=0)
    return pixels, bunch.target, {"train": train_idx, "test": test_idx}


@lru_cache(maxsize=None)
def digits_splits() -> dict[str, datasets.Dataset]:
    """scikit-learn's 1797 8x8 digits as {"train": 1437, "test": 360} images.

    The split is sklearn's `train_test_split(test_size=0.2, stratify=y, random_state=0)`, so it is the
    same on every machine. Pixel values 0..16 are scaled to 0..255 (round(v * 255 / 16)) and stored as
    grayscale PNG.
    """
    pixels, labels, splits = _digit_pixels()
    out = {}
    for split, idx in splits.items():
        data = {"image": [_encode(pixels[i], "PNG") for i in idx], "label": [int(labels[i]) for i in idx]}
        out[split] = datasets.Dataset.from_dict(data, features=_features(DIGITS_CLASSES), split=split)
    return out


@lru_cache(maxsize=8)
def synthetic_split(split: str, img_size: int, seed: int = 0, num_classes: int = 1000) -> datasets.Dataset:
    """Random RGB images of img_size x img_size with random labels, for benchmarks.

    Images are smooth random fields (random 1/8-resolution noise, upsampled) stored as JPEG, so decoding
    costs about what a natural photo of that size costs. Train and test use different seeds.
    """
    n = SYNTHETIC_SIZES[split]
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    low = max(1, img_size // 8)
    noise = rng.integers(0, 256, size=(n, low, low, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, size=n)
    images = []
    for field in noise:
        img = Image.fromarray(field).resize((img_size, img_size), Image.BILINEAR)
        images.append(_encode(np.asarray(img), "JPEG", quality=90))
    names = [str(i) for i in range(num_classes)]
    return datasets.Dataset.from_dict(
        {"image": images, "label": labels.tolist()}, features=_features(names), split=split
    )


DIGITS_SEG_CLASSES = ["background"] + DIGITS_CLASSES  # digit d is class d + 1
DIGITS_SEG_SIZES = {"train": 2000, "val": 500}
DIGITS_SEG_CANVAS = 32
DIGITS_SEG_SIDES = (10, 20)  # a pasted digit's side in pixels, uniform in this range
DIGITS_SEG_INK = 64  # a pasted pixel at least this bright (of 255) belongs to its digit's mask
DIGITS_SEG_TRIES = 50  # positions drawn for a digit before it is left out (digits never overlap)


def _pasted_canvases(rng: np.random.Generator, pool: np.ndarray, count: int, canvas: int, max_digits: int,
                     sides: tuple[int, int]):
    """`count` grey canvases with 1..max_digits digits of `pool` pasted on each, digits never overlapping:
    yields (image, [(window, ink, digit label)]) with each digit's window (row and column slices) and its
    ink (pixels at least DIGITS_SEG_INK bright) within the window."""
    pixels, labels, _ = _digit_pixels()
    for _ in range(count):
        image = np.zeros((canvas, canvas), dtype=np.uint8)
        taken = np.zeros_like(image, dtype=bool)  # the squares of the digits placed so far
        placed = []
        for _ in range(int(rng.integers(1, max_digits + 1))):
            i = int(rng.choice(pool))
            side = int(rng.integers(sides[0], sides[1] + 1))
            digit = np.asarray(Image.fromarray(pixels[i]).resize((side, side), Image.BILINEAR))
            for _ in range(DIGITS_SEG_TRIES):
                top, left = (int(v) for v in rng.integers(0, canvas - side + 1, size=2))
                window = (slice(top, top + side), slice(left, left + side))
                if not taken[window].any():
                    break
            else:
                continue  # no room left for this one
            taken[window] = True
            image[window] = digit
            placed.append((window, digit >= DIGITS_SEG_INK, int(labels[i])))
        yield image, placed


@lru_cache(maxsize=None)
def digits_seg_splits() -> dict[str, datasets.Dataset]:
    """`digits-seg`: a semantic segmentation set made of scikit-learn's digits, built in.

    Each 32x32 grey canvas holds one to three digits of the matching digits split (train: the training
    digits; val: the test digits), each resized (bilinear) to a side of 10-20 px and pasted at a uniform
    position where its square overlaps no digit placed before (up to 50 draws; a digit that finds no room
    is left out, so a canvas may hold fewer than it drew). The mask labels each pixel of a digit (at least
    64 of 255 after resizing) with its class + 1 and everything else 0 (background): 11 classes. Seeded
    (numpy's default_rng(0) for train, (1) for val), so every machine builds the same 2,000 + 500 images.
    Images and masks are grey PNGs.
    """
    _, _, pools = _digit_pixels()
    features = datasets.Features({"image": datasets.Image(), "mask": datasets.Image()})
    out = {}
    for seed, (split, pool) in enumerate((("train", pools["train"]), ("val", pools["test"]))):
        rows: dict[str, list] = {"image": [], "mask": []}
        canvases = _pasted_canvases(np.random.default_rng(seed), pool, DIGITS_SEG_SIZES[split], DIGITS_SEG_CANVAS, 3, DIGITS_SEG_SIDES)
        for image, placed in canvases:
            mask = np.zeros_like(image)
            for window, ink, label in placed:
                mask[window][ink] = label + 1
            rows["image"].append(_encode(image, "PNG"))
            rows["mask"].append(_encode(mask, "PNG"))
        out[split] = datasets.Dataset.from_dict(rows, features=features, split=split)
    return out


DIGITS_DET_SIZES = {"train": 2000, "val": 500}
DIGITS_DET_CANVAS = 64
DIGITS_DET_SIDES = (12, 28)
DIGITS_DET_MAX = 5


@lru_cache(maxsize=None)
def digits_det_splits() -> dict[str, datasets.Dataset]:
    """`digits-det`: an object detection set made of scikit-learn's digits, built in, in the Hugging Face
    detection schema (`image`, and `objects` with COCO `bbox` [x, y, w, h], `category`, the digit, and
    `segmentation`, its ink as an instance mask: COCO compressed RLE counts, data/instance_masks.py).

    Each 64x64 grey canvas holds one to five digits of the matching digits split, placed as in digits-seg
    (sides 12-28 px, no overlaps). A digit's box is the tightest box around its ink (pixels at least 64 of
    255), in pixel edges. Seeded (numpy's default_rng(10) for train, (11) for val): the same 2,000 + 500
    images on every machine, as grey PNGs.
    """
    _, _, pools = _digit_pixels()
    objects = objects_feature(masks=True, category=datasets.ClassLabel(names=DIGITS_CLASSES))
    features = datasets.Features({"image": datasets.Image(), "objects": objects})
    out = {}
    for seed, (split, pool) in zip((10, 11), (("train", pools["train"]), ("val", pools["test"]))):
        rows: dict[str, list] = {"image": [], "objects": []}
        canvases = _pasted_canvases(np.random.default_rng(seed), pool, DIGITS_DET_SIZES[split], DIGITS_DET_CANVAS, DIGITS_DET_MAX,
                                    DIGITS_DET_SIDES)
        for image, placed in canvases:
            found: dict[str, list] = {"bbox": [], "category": [], "iscrowd": [], "area": [], "segmentation": []}
            for (rows_, cols), ink, label in placed:
                mask = np.zeros_like(image)
                mask[rows_, cols] = ink
                found["segmentation"].append(encode_masks(mask[None])[0]["counts"])
                found["iscrowd"].append(0)
                ys, xs = np.nonzero(ink)
                x, y = cols.start + int(xs.min()), rows_.start + int(ys.min())
                w, h = int(xs.max() - xs.min()) + 1, int(ys.max() - ys.min()) + 1
                found["bbox"].append([float(x), float(y), float(w), float(h)])
                found["category"].append(label)
                found["area"].append(float(w * h))
            rows["image"].append(_encode(image, "PNG"))
            rows["objects"].append(found)
        out[split] = datasets.Dataset.from_dict(rows, features=features, split=split)
    return out
