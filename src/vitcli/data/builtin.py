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

DIGITS_CLASSES = [str(i) for i in range(10)]
SYNTHETIC_SIZES = {"train": 1024, "test": 256}


def _features(class_names: list[str]) -> datasets.Features:
    return datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})


def _encode(array: np.ndarray, fmt: str, **kwargs) -> dict:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return {"bytes": buf.getvalue(), "path": None}


@lru_cache(maxsize=None)
def digits_splits() -> dict[str, datasets.Dataset]:
    """scikit-learn's 1797 8x8 digits as {"train": 1437, "test": 360} images.

    The split is sklearn's `train_test_split(test_size=0.2, stratify=y, random_state=0)`, so it is the
    same on every machine. Pixel values 0..16 are scaled to 0..255 (round(v * 255 / 16)) and stored as
    grayscale PNG.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images, labels = bunch.images, bunch.target
    pixels = np.round(images * (255.0 / 16.0)).astype(np.uint8)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.2, stratify=labels, random_state=0
    )
    out = {}
    for split, idx in (("train", train_idx), ("test", test_idx)):
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
