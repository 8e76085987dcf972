"""What a loader worker hands the main process, and the main process's half of the tensor pipeline.

A worker returns one collated `Batch`: float images (PIL pipeline), or uint8 images at the final size
plus `Deferred` JPEGs (tensor pipeline, decode_on_device) and `Cuts` (training crops of the decoded cache,
data.cache). `finish_batch` runs in the main process: it moves uint8 images to the device, decodes and
crops the deferred JPEGs there, resizes and flips the cuts there as one batch, restores batch order and
normalises.
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple, Optional

import torch

from vitcli.data.decode import decode_on_device
from vitcli.data.tensor_transforms import CropPlan, TensorTransform
from vitcli.errors import VitError

BadImages = Literal["error", "skip"]


class Deferred(NamedTuple):
    """A JPEG left for the device: the main process decodes it and applies its plan there."""

    position: int  # in the batch
    index: int  # in the data set (for messages)
    path: Optional[str]
    data: torch.Tensor  # the encoded bytes, uint8 (a tensor so pinning and worker transfer stay cheap)
    plan: Optional[CropPlan]


class Cuts(NamedTuple):
    """Training crops cut from the decoded cache, left for the device to resize and flip (data.cache): their
    pixels in one flat uint8 buffer (pinned by the loader, so one host-to-device copy per batch), image k's
    (h, w, C) at offsets sum(prod(shapes[:k]))."""

    positions: tuple[int, ...]  # in the batch
    pixels: torch.Tensor
    shapes: tuple[tuple[int, int, int], ...]
    plans: tuple[CropPlan, ...]  # each crop's plan: its box (already cut) and flip


class Batch(NamedTuple):
    # (N, C, H, W): float from the PIL pipeline, uint8 from the tensor pipeline (then only the images not
    # deferred, in batch order); None when there is none. Several views per image (data/views.py): a
    # tuple of float batches, one per view. Images of different sizes (detection): a list.
    images: Optional[torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]]
    # (N,) int64 for every image of the batch, deferred ones included; (N, H, W) masks; a list of
    # torchvision target dicts (detection)
    labels: Optional[torch.Tensor | list[dict[str, torch.Tensor]]]
    skipped: list[str]  # one line per dropped image (bad_images="skip")
    error: Optional[str]  # the message to raise in the main process (bad_images="error")
    deferred: tuple[Deferred, ...] = ()
    cuts: Optional[Cuts] = None


def unreadable(name: str, split: str, index: int, path: Optional[str], e: Exception) -> str:
    """One line naming an image no decoder reads (the skip log; `FIX` is appended for the error)."""
    where = f" ({path})" if path else ""
    return f"Image {index} of data set '{name}' split '{split}'{where} cannot be read: {type(e).__name__}: {e}."


FIX = (
    " Replace or delete that file, or drop unreadable images and count them: data.bad_images: skip "
    "(vit pretrain / finetune: --set data.bad_images=skip; vit eval: --bad-images skip)."
)


def to_device(value, device: torch.device):
    """Tensors, and tuples, lists and dicts of them, on `device` (copied without blocking)."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device) for v in value)
    return value


def nbytes(value) -> int:
    """Bytes held by tensors, and by tuples, lists and dicts of them."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    return 0


class BatchBuffers:
    """Two float batches a CPU loader normalises into in turn (LoaderSpec.reuse_buffers). A batch of 64
    images at 224 px is 38 MiB, which the C allocator maps afresh, page by zeroed page, at every allocation:
    that cost as much as the normalisation itself. Batch k's buffer is written again for batch k + 2."""

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] = []
        self.turn = 0

    def take(self, like: torch.Tensor) -> Optional[torch.Tensor]:
        """A float32 buffer of `like`'s shape (None off the CPU, where the device's allocator caches)."""
        if like.device.type != "cpu":
            return None
        if not self.buffers or self.buffers[0].shape != like.shape:
            self.buffers = [torch.empty(like.shape, dtype=torch.float32) for _ in range(2)]
        self.turn = (self.turn + 1) % 2
        return self.buffers[self.turn]


def finish_batch(batch: Batch, transform: Callable, bad_images: BadImages, device: torch.device,
                 name: str = "", split: str = "", buffers: Optional[BatchBuffers] = None
                 ) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor], list[str]]:
    """The main process's half: (images, labels, newly skipped), delivered on `device`.

    PIL batches are only moved; tensor batches move as uint8, deferred JPEGs are decoded and cropped
    on the device, cuts are resized and flipped there, and the whole batch is normalised there. Raises
    VitError for an unreadable deferred image under bad_images "error".
    """
    if batch.labels is None:  # every image of the batch was unreadable (and skipped)
        return None, None, []
    if not isinstance(transform, TensorTransform):  # views (a tuple), sized lists and target dicts move as they are
        return to_device(batch.images, device), to_device(batch.labels, device), []
    labels, skipped = batch.labels, []
    ready = batch.images.to(device, non_blocking=True) if batch.images is not None else None
    cut = transform.resize_cuts(batch.cuts, device) if batch.cuts is not None else None

    def normalized(images: torch.Tensor) -> torch.Tensor:
        return transform.normalize(images, out=buffers.take(images) if buffers is not None else None)

    if cut is not None and ready is None and not batch.deferred:  # every image from the decoded cache
        return normalized(cut), labels.to(device, non_blocking=True), []
    if not batch.deferred and cut is None:
        return (normalized(ready) if ready is not None else None), labels.to(device, non_blocking=True), []
    # Assemble in batch order from per-image views and one stack: no index masks are copied to the
    # device (a copy from pageable memory would wait for the training step queued before it).
    slots: list[Optional[torch.Tensor]] = [None] * len(labels)
    if cut is not None:
        for position, image in zip(batch.cuts.positions, cut.unbind(0)):
            slots[position] = image
    elsewhere = {d.position for d in batch.deferred} | set(batch.cuts.positions if batch.cuts else ())
    ready_images = iter(ready.unbind(0) if ready is not None else ())
    for position in range(len(labels)):
        if position not in elsewhere:
            slots[position] = next(ready_images)
    decoded = decode_on_device([d.data for d in batch.deferred], transform.mode, device) if batch.deferred else []
    for d, image in zip(batch.deferred, decoded):
        if isinstance(image, Exception):
            problem = unreadable(name, split, d.index, d.path, image)
            if bad_images == "error":
                raise VitError(problem + FIX)
            skipped.append(problem)
            continue
        slots[d.position] = transform.apply(image, d.plan)
    keep = [image is not None for image in slots]
    if not all(keep):
        labels = labels[torch.tensor(keep)]
    images = [image for image in slots if image is not None]
    labels = labels.to(device, non_blocking=True)
    return (normalized(torch.stack(images)) if images else None), labels, skipped
