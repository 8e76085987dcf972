"""One collated Batch from encoded images, in a loader worker: decode, seed each image's augmentation, transform.

Shared by the map-style loader (images by index) and the streams (samples from tar shards or a Hub stream).
"""

from __future__ import annotations

from typing import Callable, Optional

import datasets
import numpy as np
import torch
from PIL import Image

from vitcli.data.batches import FIX, BadImages, Batch, Cuts, Deferred, unreadable
from vitcli.data.decode import as_byte_tensor, decode_host, decode_reduced, encoded_bytes, jpeg_size, scalable_jpeg_size
from vitcli.data.tensor_transforms import CropPlan, TensorTransform
from vitcli.errors import VitError
from vitcli.rng import preserved_rng, seed_all


def build_batch(items: list[tuple[tuple[int, ...], int, dict, int]], transform: Callable, seed: int, *,
                bad_images: BadImages, decode_on_device: bool, name: str, split: str,
                decoder: Optional[datasets.Image] = None, decode_target: Optional[Callable] = None) -> Batch:
    """One collated Batch from (augmentation key, index for messages, encoded image cell, label) items.

    Each image is augmented from (seed, *key), independently of batching, workers and ranks. With
    `decode_target` the label is an encoded target (a mask, a detection's objects): decoded, transformed
    with the image by a joint transform, and batched by that transform's `collate` (masks: stacked, padded
    to the batch's largest, images with 0 and masks with -1, not the image's; boxes: lists)."""
    decoder = decoder or datasets.Image()
    tensors = isinstance(transform, TensorTransform)
    images, deferred, labels, skipped = [], [], [], []
    to_cut: list[tuple[int, np.ndarray, CropPlan]] = []  # (position, cached (H, W, C) pixels, plan)
    with preserved_rng():
        for key, index, cell, label in items:
            seed_all(seed, *key)
            try:
                # PIL pipeline: datasets decodes (bytes or path; calls img.load()); tensor: see _prepare
                image = _prepare(cell, transform, decode_on_device) if tensors else _pil_image(cell, decoder)
                if decode_target is not None:
                    image, label = transform(image, decode_target(label))
            except VitError as e:  # a mask vitcli cannot use: its own message, whatever bad_images says
                where = f" ({cell.get('path')})" if cell.get("path") else ""
                return Batch(None, None, skipped, f"Image {index} of data set '{name}' split '{split}'{where}: {e}")
            except Exception as e:  # noqa: BLE001 -- any decoder failure means an unreadable image
                problem = unreadable(name, split, index, cell.get("path"), e)
                if bad_images == "error":
                    return Batch(None, None, skipped, problem + FIX)
                skipped.append(problem)
                continue
            if decode_target is not None:
                images.append(image)
            elif not tensors:
                images.append(transform(image))
            elif isinstance(image[0], np.ndarray):  # cached pixels: cut now, resized on the device with the batch
                to_cut.append((len(labels), *image))
            elif isinstance(image[0], bytes):  # a JPEG for the device: planned now, decoded there
                data, plan = image
                deferred.append(Deferred(len(labels), index, cell.get("path"), as_byte_tensor(data), plan))
            else:
                images.append(transform.apply(*image))
            labels.append(label)
    if not labels:
        return Batch(None, None, skipped, None)
    if decode_target is not None:  # the joint transform batches its own kind of target
        return Batch(*transform.collate(images, labels), skipped, None)
    stacked = stack_views(images) if images else None
    targets = torch.tensor(labels, dtype=torch.float32 if isinstance(labels[0], list) else torch.int64)  # multi-hot or ids
    return Batch(stacked, targets, skipped, None, tuple(deferred), cuts_of(to_cut) if to_cut else None)


def cuts_of(to_cut: list[tuple[int, np.ndarray, CropPlan]]) -> Cuts:
    """Each plan's box of its cached (H, W, C) pixels, copied once (row by row) into one flat buffer: one
    buffer for the loader to pin and the device to receive."""
    shapes = tuple((plan.height, plan.width, pixels.shape[2]) for _, pixels, plan in to_cut)
    flat = np.empty(sum(h * w * c for h, w, c in shapes), dtype=np.uint8)
    start = 0
    for (_, pixels, plan), (h, w, c) in zip(to_cut, shapes):
        box = pixels[plan.top:plan.top + h, plan.left:plan.left + w]
        flat[start:start + h * w * c].reshape(h, w, c)[...] = box
        start += h * w * c
    return Cuts(tuple(p for p, _, _ in to_cut), torch.from_numpy(flat), shapes, tuple(plan for _, _, plan in to_cut))


def stack_views(images: list) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Per-image tensors stacked into a batch; per-image tuples of views (multi-crop) into one batch per view."""
    if isinstance(images[0], tuple):
        return tuple(torch.stack(view) for view in zip(*images))
    return torch.stack(images)


def padded_stack(tensors: list[torch.Tensor], fill: float) -> torch.Tensor:
    """Tensors of (..., H_i, W_i) stacked into (N, ..., max H, max W), padded bottom and right with `fill`."""
    h, w = max(t.shape[-2] for t in tensors), max(t.shape[-1] for t in tensors)
    return torch.stack([torch.nn.functional.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2]), value=fill) for t in tensors])


def _pil_image(cell: dict, decoder: datasets.Image) -> Image.Image:
    """The PIL pipeline's image: from the decoded cache's (H, W, C) pixels, or decoded by datasets."""
    pixels = cell.get("decoded")
    if pixels is None:
        return decoder.decode_example(cell)
    return Image.fromarray(np.array(pixels[..., 0] if pixels.shape[2] == 1 else pixels))


def _prepare(cell: dict, transform: TensorTransform, decode_on_device: bool
             ) -> tuple[torch.Tensor | bytes, Optional[CropPlan]]:
    """The tensor pipeline's (image, plan): JPEG bytes to decode on the device, or a host-decoded uint8
    image, at reduced size when the plan allows (the plan then scaled to it).

    The plan is drawn from the full size in every case, so an image gets the same crop and flip
    whichever way it is decoded."""
    if cell.get("decoded") is not None:  # the decoded cache's (H, W, C) pixels: cut later (training) or copied
        pixels = cell["decoded"]
        plan = transform.plan(pixels.shape[1], pixels.shape[0])
        return (pixels, plan) if plan is not None else (torch.from_numpy(np.array(pixels)).permute(2, 0, 1), None)
    data = encoded_bytes(cell)
    size = jpeg_size(data, transform.mode) if decode_on_device else None
    if size:
        return data, transform.plan(*size)
    size = scalable_jpeg_size(data) if transform.reduced_decode else None
    if size:
        plan = transform.plan(*size)
        factor = transform.reduction(*size, plan)
        image = decode_reduced(data, transform.mode, factor)
        return image, (plan.reduced(factor, image.shape[-2], image.shape[-1]) if plan else None)
    image = decode_host(data, transform.mode)
    return image, transform.plan(image.shape[-1], image.shape[-2])
