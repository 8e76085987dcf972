"""Batches of (images, labels) from an ImageSet, reproducible across resume, workers and ranks.

- Order: the batch sampler's permutation is a pure function of (seed, epoch); each rank takes a
  contiguous slice of every global batch; the first `start_batch` batches of an epoch can be skipped
  without being loaded (exact mid-epoch resume).
- Augmentation: each image seeds python `random`, numpy and torch (CPU) from (seed, epoch, index)
  inside a saved-and-restored RNG context, so an image is augmented the same way whichever worker,
  rank or batch loads it, after a resume too, and loading in the main process (num_workers=0) leaves
  the training RNG untouched.
- Whole batches are read at once (`__getitems__` -> one Arrow read); images are decoded in the worker.
- Two pipelines, by the transform's type: timm's PIL transforms (float batches out of the workers), or
  a TensorTransform: workers decode to uint8, plan and apply crops; uint8 batches cross to the device,
  where the main process normalises them. With `decode_on_device`, workers send JPEG bytes and crop
  plans instead, and the main process decodes (nvJPEG on CUDA) and crops on the device. With the decoded
  cache (data.cache), training images leave the worker as their crop boxes cut from the cached pixels, one
  flat buffer per batch, which the main process resizes and flips on the device as one batch.
- Unreadable images: data.bad_images "error" stops with a message naming the image; "skip" drops it
  from its batch and counts it in `Loader.skipped`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Callable, NamedTuple, Optional

import datasets
import torch

from vitcli.data.balance import sample_weights
from vitcli.data.batches import BadImages, Batch, BatchBuffers, finish_batch, nbytes
from vitcli.data.collate import build_batch
from vitcli.data.decoded_cache import DecodedImages, decode_for
from vitcli.data.multilabel import multi_hot
from vitcli.data.sources import ImageSet
from vitcli.data.specs import LoaderSpec
from vitcli.data.tensor_transforms import TensorTransform
from vitcli.errors import VitError
from vitcli.rng import derive_seed


class EpochBatch(NamedTuple):
    """What the batch sampler yields: the epoch travels with the indices, so workers need no state."""

    epoch: int
    indices: list[int]
    copies: Optional[list[int]] = None  # repeated augmentation: which copy of its image each index is


class BatchDataset(torch.utils.data.Dataset):
    """A torch Dataset over an ImageSet that reads, decodes and augments whole batches."""

    def __init__(self, image_set: ImageSet, transform: Callable, *, seed: int = 0, bad_images: BadImages = "error",
                 decode_on_device: bool = False, decoded: Optional[DecodedImages] = None):
        # decode=False: we decode ourselves, one image at a time, to catch and name unreadable ones.
        self.hf = image_set.dataset.cast_column("image", datasets.Image(decode=False))
        if image_set.target_column == "mask":
            self.hf = self.hf.cast_column("mask", datasets.Image(decode=False))
        self.decoder = datasets.Image()
        self.name, self.split = image_set.name, image_set.split
        self.transform = transform
        self.seed = seed
        self.bad_images = bad_images
        self.decode_on_device = decode_on_device and isinstance(transform, TensorTransform)
        self.num_classes = image_set.num_classes if image_set.multilabel else None  # multi-hot targets
        self.target_column, self.decode_target = image_set.target_column, image_set.target_decoder()
        self.epoch = 0  # used only when indexed directly; the loader sends the epoch with each batch
        self.decoded = decoded  # data.cache: pixels decoded once; then only the other columns are read per batch
        if decoded is not None:
            self.without_images = self.hf.select_columns([c for c in self.hf.column_names if c != "image"])

    def __len__(self) -> int:
        return len(self.hf)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        batch = self.load([index], self.epoch)
        if batch.error:
            raise VitError(batch.error)
        if batch.skipped:
            raise VitError(batch.skipped[0])
        images, labels, _ = finish_batch(batch, self.transform, self.bad_images, torch.device("cpu"))
        return images[0], int(labels[0])

    def __getitems__(self, request: EpochBatch | list[int]) -> Batch:
        """DataLoader's batched fetch: one call per batch; returns the collated Batch."""
        if isinstance(request, EpochBatch):
            return self.load(request.indices, request.epoch, request.copies)
        return self.load(list(request), self.epoch)

    def load(self, indices: list[int], epoch: int, copies: Optional[list[int]] = None) -> Batch:
        """Read, decode and transform the images at indices (each augmented from (seed, epoch, index), and
        the copy number for every repeated copy but the first, so each copy is augmented differently)."""
        rows = (self.hf if self.decoded is None else self.without_images)[indices]  # one Arrow read for the whole batch
        cells = rows["image"] if self.decoded is None else [self._cached_cell(index) for index in indices]
        copies = copies or [0] * len(indices)
        labels = rows[self.target_column] if self.num_classes is None else multi_hot(rows["label"], self.num_classes)
        items = [((epoch, index, *((copy,) if copy else ())), index, cell, label)
                 for index, copy, cell, label in zip(indices, copies, cells, labels)]
        return build_batch(items, self.transform, self.seed, bad_images=self.bad_images,
                           decode_on_device=self.decode_on_device, name=self.name, split=self.split, decoder=self.decoder,
                           decode_target=self.decode_target)

    def _cached_cell(self, index: int) -> dict:
        """A cell holding the image's decoded pixels; the encoded cell for one the cache could not decode."""
        pixels = self.decoded[index]
        return self.hf[index]["image"] if pixels is None else {"path": None, "bytes": None, "decoded": pixels}


class EpochBatchSampler:
    """Global batches in a (seed, epoch)-determined order; yields this rank's slice of each.

    `batch_size` is the global batch: each of `world_size` ranks gets a contiguous slice of it (sizes
    differ by at most one in a short last batch). `start_batch` skips that many batches of the next
    iteration only, without loading them.

    `repeats` > 1 is repeated augmentation (Hoffer et al., 2020; DeiT's and timm's RepeatAugSampler): the
    permutation with each image repeated `repeats` times in a row, cut to the epoch's n samples (so an epoch
    sees n / repeats distinct images, each `repeats` times, augmented independently); each rank takes every
    world_size-th sample of a global batch, so the copies of an image land on different ranks as in DeiT.

    `weights` (one per image) draws the epoch's n images with replacement in proportion to them instead of
    permuting: the class-balanced sampler (data/balance.py).
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int = 0, epoch: int = 0,
                 start_batch: int = 0, rank: int = 0, world_size: int = 1, repeats: int = 1,
                 weights: Optional[torch.Tensor] = None):
        self.n, self.batch_size, self.shuffle, self.drop_last = n, batch_size, shuffle, drop_last
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch
        self.rank, self.world_size, self.repeats, self.weights = rank, world_size, repeats, weights

    @property
    def num_batches(self) -> int:
        """Global batches in one full epoch."""
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        if self.weights is not None:
            perm = torch.multinomial(self.weights, self.n, replacement=True, generator=generator)
        else:
            perm = torch.randperm(self.n, generator=generator)
        return perm.repeat_interleave(self.repeats)[: self.n] if self.repeats > 1 else perm

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start_batch)

    def __iter__(self) -> Iterator[EpochBatch]:
        start, self.start_batch = self.start_batch, 0  # a resume offset applies to one iteration only
        order = self.order()
        for b in range(start, self.num_batches):
            positions = torch.arange(b * self.batch_size, min((b + 1) * self.batch_size, self.n))
            if self.repeats > 1:
                mine = positions[self.rank::self.world_size]
                if len(mine):
                    yield EpochBatch(self.epoch, order[mine].tolist(), (mine % self.repeats).tolist())
                continue
            mine = torch.tensor_split(positions, self.world_size)[self.rank]
            if len(mine):
                yield EpochBatch(self.epoch, order[mine].tolist())


def _keep_batch(batch: Batch) -> Batch:
    return batch  # __getitems__ already collated; module-level so worker processes can pickle it


class Delivery:
    """What both loaders (map-style and shard stream) do in the main process with their DataLoader's
    batches: finish them on the device, count the skipped images, raise a worker's error, and stop the
    workers on the way out. Subclasses set `dataloader`, `device`, `skipped` and `skipped_examples`."""

    dataloader: torch.utils.data.DataLoader
    device: torch.device
    buffers: Optional[BatchBuffers] = None  # LoaderSpec.reuse_buffers
    _live = None  # the iterator being consumed

    def close(self) -> None:
        """Stop the worker processes now; the next iteration starts new ones.

        Without this, persistent workers live until the loader is garbage-collected, and when that
        happens inside a reference cycle (e.g. via a stored traceback) their queues may be finalised
        first, so shutdown waits ~5 s per worker. We call it before raising a bad-image error.
        """
        for iterator in (getattr(self.dataloader, "_iterator", None), getattr(self, "_live", None)):
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
        self.dataloader._iterator = self._live = None

    def _delivered(self, transform: Callable, bad_images: BadImages, name: str, split: str
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # kept, so close() reaches a stream's workers too (a non-persistent iterator is not kept by its loader)
        self._live = iter(self.dataloader)
        for batch in self._live:
            self._count(batch.skipped)
            if batch.error:
                self.close()
                raise VitError(batch.error)
            try:
                images, labels, skipped = finish_batch(batch, transform, bad_images, self.device, name, split, self.buffers)
            except VitError:
                self.close()
                raise
            self._count(skipped)
            if images is not None:  # a batch with no readable image at all is dropped (and counted)
                yield images, labels

    def _count(self, problems: list[str]) -> None:
        self.skipped += len(problems)
        self.skipped_examples.extend(problems[: max(0, 10 - len(self.skipped_examples))])


class Loader(Delivery):
    """Iterate to get (images, labels); `skipped` counts images dropped as unreadable (bad_images=skip).

    `len(loader)` is the number of batches the next iteration yields (after a `start_batch` skip);
    `batches_per_epoch` is the full count. Call `set_epoch(e)` before each epoch.
    """

    def __init__(self, dataloader: torch.utils.data.DataLoader, sampler: EpochBatchSampler, dataset: BatchDataset,
                 device: torch.device = torch.device("cpu"), cache_bytes: int = 0, cache_note: str = ""):
        self.dataloader, self.sampler, self.dataset, self.device = dataloader, sampler, dataset, device
        self.cache_bytes = cache_bytes
        self.cached: Optional[list[tuple[torch.Tensor, torch.Tensor]]] = None
        self.skipped = 0
        self.skipped_examples: list[str] = []  # the first few, for the log
        self.cache_note = cache_note  # what data.cache did, for the start of a run

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def batches_per_epoch(self) -> int:
        return self.sampler.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)
        self.dataset.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.cached is not None:
            yield from self.cached
            return
        kept: Optional[list] = [] if self.cache_bytes else None
        size = 0
        for images, labels in self._finished():
            if kept is not None:
                size += nbytes(images) + nbytes(labels)
                if size <= self.cache_bytes:
                    kept.append((images, labels))
                else:
                    kept = None
            yield images, labels
        if kept is not None:  # a whole pass, within budget (a consumer that stops early leaves no cache)
            self.cached = kept
            self.close()  # the workers have nothing left to do

    def _finished(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds = self.dataset
        return self._delivered(ds.transform, ds.bad_images, ds.name, ds.split)


def make_loader(
    image_set: ImageSet,
    transform: Callable,
    spec: LoaderSpec,
    *,
    epoch: int = 0,
    start_batch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: Optional[torch.device] = None,
) -> Loader:
    """A Loader over image_set (see the module docstring for the guarantees), batched as `spec` says.

    Args:
        epoch: fixes, with spec.seed, the order and the augmentation; change it with `loader.set_epoch`.
        start_batch: skip this many batches of the first iteration (resume mid-epoch).
        rank, world_size: this process's slice of every global batch (spec.batch_size must divide evenly).
        device: where batches are delivered (and the tensor pipeline's normalised); default CPU.
    """
    batch_size, seed = spec.batch_size, spec.seed
    if spec.cache_bytes and getattr(transform, "train", False):
        raise ValueError("cache_bytes is for evaluation loaders only (no shuffling, no augmentation).")
    device = torch.device(device or "cpu")
    if batch_size % world_size:
        raise VitError(
            f"The global batch size ({batch_size}) must be a positive multiple of the number of processes "
            f"({world_size})."
        )
    on_device = device.type == "cuda" if spec.decode_on_device is None else spec.decode_on_device
    decoded, cache_note = decode_for(image_set.dataset, transform, spec.cache)
    dataset = BatchDataset(image_set, transform, seed=seed, bad_images=spec.bad_images, decode_on_device=on_device,
                           decoded=decoded)
    dataset.set_epoch(epoch)
    sampler = EpochBatchSampler(len(dataset), batch_size, shuffle=spec.shuffle, drop_last=spec.drop_last, seed=seed,
                                epoch=epoch, start_batch=start_batch, rank=rank, world_size=world_size, repeats=spec.repeats,
                                weights=sample_weights(image_set) if spec.balanced else None)
    dataloader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=spec.num_workers,
        collate_fn=_keep_batch,
        pin_memory=torch.cuda.is_available() if spec.pin_memory is None else spec.pin_memory,
        persistent_workers=spec.num_workers > 0,  # safe: workers hold no epoch state, it comes with each batch
        # A private generator: DataLoader draws worker base seeds from it instead of the global torch RNG,
        # which would otherwise shift the training RNG at every epoch start (and break exact resume).
        generator=torch.Generator().manual_seed(derive_seed(seed, rank)),
    )
    loader = Loader(dataloader, sampler, dataset, device, spec.cache_bytes, cache_note)
    loader.buffers = BatchBuffers() if spec.reuse_buffers and not spec.cache_bytes else None
    return loader
