"""Imbalanced classes: how many images each class has, a long-tailed subsample for experiments, and the two
remedies (`data.balance`): a class-balanced sampler, or loss weights per class.

- Long tail (`data.imbalance: R`): class c keeps n_max x R^(-c / (C - 1)) of its training images, so class 0
  keeps n_max = the smallest class's count and the last class 1/R of that (Cui et al., 2019, CIFAR-LT).
- Sampler: every image drawn with probability proportional to 1 / its class's count (with replacement),
  so each class fills about 1 / C of an epoch. A stream (tar shards, data.streaming) draws the same way
  from its shuffle buffer instead (data/sample_stream.py).
- Loss weights: w_c proportional to 1 / n_c (inverse frequency) or to 1 / E_c with E_c = (1 - beta^n_c) /
  (1 - beta), the effective number of samples (Cui et al., 2019); scaled so that the weights average 1
  over the training images (inverse) or over the classes (effective, as Cui et al. normalise them).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from vitcli.data.sample_stream import StreamedSet
from vitcli.data.sources import ImageSet, label_array
from vitcli.errors import VitError

IMBALANCE_SHOWN = 5.0  # the start line lists the class counts above this max / min ratio


def class_counts(train: ImageSet | StreamedSet) -> Optional[np.ndarray]:
    """Images per class (length num_classes) of a split with one label per image: counted for a map-style
    set, read from the shard index for tar shards (`vit shards` writes them); None where a stream does not say."""
    if isinstance(train, StreamedSet):
        return None if train.class_counts is None else np.asarray(train.class_counts, dtype=np.int64)
    return np.bincount(label_array(train.dataset), minlength=train.num_classes)


def imbalance_ratio(counts: np.ndarray) -> float:
    present = counts[counts > 0]
    return float(present.max() / present.min()) if len(present) else 1.0


def long_tail(image_set: ImageSet, ratio: float, seed: int) -> ImageSet:
    """A seeded subsample whose class counts fall exponentially from n_max (class 0) to n_max / ratio."""
    if image_set.multilabel:
        raise VitError(f"data.imbalance counts one class per image; {image_set.name} has several. Drop it for multi-label data.")
    labels, classes = label_array(image_set.dataset), image_set.num_classes
    counts = np.bincount(labels, minlength=classes)
    top = int(counts[counts > 0].min())
    rng = np.random.default_rng(seed)
    keep = []
    for c in range(classes):
        want = max(1, round(top * ratio ** (-c / max(classes - 1, 1))))
        members = np.flatnonzero(labels == c)
        keep.append(rng.permutation(members)[:want])
    index = np.sort(np.concatenate(keep))
    return ImageSet(image_set.dataset.select(index, keep_in_memory=True), classes, image_set.class_names,
                    image_set.name, f"{image_set.split}[long tail {ratio:g}:1]")


def sample_weights(image_set: ImageSet) -> torch.Tensor:
    """Per image, 1 / its class's count: what the class-balanced sampler draws by."""
    labels = label_array(image_set.dataset)
    return torch.as_tensor(1.0 / np.bincount(labels, minlength=image_set.num_classes)[labels], dtype=torch.float64)


def loss_weights(counts: np.ndarray, kind: str, beta: float) -> torch.Tensor:
    """Per-class weights of the labels' loss (see the module docstring); classes without images get 0."""
    counts = np.asarray(counts, dtype=np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    if kind == "effective":
        effective = (1.0 - beta ** counts[present]) / (1.0 - beta)
        weights[present] = 1.0 / effective
        weights *= present.sum() / weights.sum()
    else:
        weights[present] = 1.0 / counts[present]
        weights *= counts.sum() / (weights * counts).sum()
    return torch.as_tensor(weights, dtype=torch.float32)
