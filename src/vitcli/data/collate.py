"""One collated Batch from encoded images, in a loader worker: decode, seed each image's augmentation, transform.

Shared by the map-style loader (images by index) and the streams (samples from tar shards or a Hub stream).
"""

from __future__ import annotations

from typing import Callable, Optional

import datasets
import torch

from vitcli.data.batches import FIX, BadImages, Batch, Deferred, unreadable
from vitcli.data.decode import as_byte_tensor, decode_host, encoded_bytes, jpeg_size
from vitcli.data.tensor_transforms import TensorTransform
from vitcli.rng import preserved_rng, seed_all


def build_batch(items: list[tuple[tuple[int, ...], int, dict, int]], transform: Callable, seed: int, *,
                bad_images: BadImages, decode_on_device: bool, name: str, split: str,
                decoder: Optional[datasets.Image] = None) -> Batch:
    """One collated Batch from (augmentation key, index for messages, encoded image cell, label) items.

    Each image is augmented from (seed, *key), independently of batching, workers and ranks."""
    decoder = decoder or datasets.Image()
    tensors = isinstance(transform, TensorTransform)
    images, deferred, labels, skipped = [], [], [], []
    with preserved_rng():
        for key, index, cell, label in items:
            seed_all(seed, *key)
            try:
                image = _read(cell, transform, decode_on_device, decoder)
            except Exception as e:  # noqa: BLE001 -- any decoder failure means an unreadable image
                problem = unreadable(name, split, index, cell.get("path"), e)
                if bad_images == "error":
                    return Batch(None, None, skipped, problem + FIX)
                skipped.append(problem)
                continue
            if not tensors:
                images.append(transform(image))
            elif isinstance(image, tuple):  # a JPEG for the device: plan now, decode there
                data, size = image
                deferred.append(Deferred(len(labels), index, cell.get("path"), as_byte_tensor(data), transform.plan(*size)))
            else:
                plan = transform.plan(image.shape[-1], image.shape[-2])
                images.append(transform.apply(image, plan))
            labels.append(label)
    if not labels:
        return Batch(None, None, skipped, None)
    stacked = torch.stack(images) if images else None
    return Batch(stacked, torch.tensor(labels, dtype=torch.int64), skipped, None, tuple(deferred))


def _read(cell: dict, transform: Callable, decode_on_device: bool, decoder: datasets.Image):
    """PIL image (PIL pipeline), uint8 tensor (tensor pipeline), or (JPEG bytes, (w, h)) to defer."""
    if not isinstance(transform, TensorTransform):
        return decoder.decode_example(cell)  # bytes or path; calls img.load()
    data = encoded_bytes(cell)
    size = jpeg_size(data, transform.mode) if decode_on_device else None
    return (data, size) if size else decode_host(data, transform.mode)
