"""The run's two batch sources: an endless training stream and a re-iterable evaluation loader."""

from __future__ import annotations

from collections.abc import Iterator

import torch


from vitcli import data as vdata
from vitcli.engine.plan import StepPlan
from vitcli.engine.setup import RunData, fewshot_shots
from vitcli.objectives import FewshotSet
from vitcli.objectives.knn import NeighbourSet
from vitcli.objectives.fewshot import needed_images
from vitcli.recipe import Recipe

EVAL_CACHE_BYTES = 256 * 2**20  # finished eval batches kept between evaluations (where they are delivered)


class TrainStream:
    """Endless micro-batches on the device, epoch after epoch, from `start_step` on; Mixup/CutMix applied.

    Each epoch yields exactly steps_per_epoch x accum micro-batches, so steps never straddle epochs.
    With several processes the loader's batch is one micro-step of all ranks (micro_batch x
    world_size images, in the same global order as with one process) and this rank takes its slice.
    `skipped` counts the unreadable training images dropped so far (data.bad_images: skip).
    """

    def __init__(self, data: RunData, recipe: Recipe, plan: StepPlan, *, start_step: int, device: torch.device,
                 rank: int = 0, world_size: int = 1, saved: dict | None = None):
        epoch, pos = divmod(start_step, plan.steps_per_epoch)
        self.per_epoch = plan.steps_per_epoch * plan.accum
        self.mixup = data.mixup
        self.restarted_epoch: int | None = None  # set when a shard stream could not resume exactly
        if vdata.is_streamed(data.train):
            spec = vdata.LoaderSpec.training(plan.micro_batch, num_workers=recipe.data.num_workers, seed=recipe.train.seed,
                                             bad_images=recipe.data.bad_images, pin_memory=device.type == "cuda",
                                             balanced=recipe.data.balance == "sampler")
            self.loader = vdata.make_stream_loader(data.train, data.train_transform, spec, epoch=epoch,
                                                   buffer=recipe.data.shuffle_buffer, rank=rank, world_size=world_size,
                                                   device=device)
            if start_step and not (saved and self.loader.load_state_dict(saved)):
                self.restarted_epoch = epoch  # saved by another number of readers (or before streams kept state)
            self._batches = self._mixed(iter(self.loader))
            return
        spec = vdata.LoaderSpec.training(plan.micro_batch * world_size, num_workers=recipe.data.num_workers,
                                         seed=recipe.train.seed, bad_images=recipe.data.bad_images,
                                         pin_memory=device.type == "cuda", repeats=recipe.data.repeated_augment,
                                         balanced=recipe.data.balance == "sampler", cache=vdata.CacheSpec.of(recipe.data),
                                         reuse_buffers=True)  # train_step is done with a micro-batch before the next
        self.loader = vdata.make_loader(data.train, data.train_transform, spec, epoch=epoch, start_batch=pos * plan.accum,
                                        rank=rank, world_size=world_size, device=device)
        self._batches = self._epochs(epoch, taken=pos * plan.accum)

    @property
    def skipped(self) -> int:
        return self.loader.skipped

    def close(self) -> None:
        """Stop the loader's worker processes (at the end of a run, however it ends)."""
        self.loader.close()

    def state_dict(self) -> dict | None:
        """This rank's stream position, for the checkpoint (None: a map-style set, whose position the step gives)."""
        return self.loader.state_dict() if isinstance(self.loader, vdata.StreamLoader) else None

    def _mixed(self, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels in batches:  # a shard stream never ends: epochs follow each other inside it
            yield self.mixup(images, labels) if self.mixup is not None else (images, labels)

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return next(self._batches)

    def _epochs(self, epoch: int, taken: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            for images, labels in self.loader:  # delivered on the device
                if self.mixup is not None:
                    images, labels = self.mixup(images, labels)
                yield images, labels
                taken += 1
                if taken == self.per_epoch:
                    break
            epoch, taken = epoch + 1, 0
            self.loader.set_epoch(epoch)


def eval_batches(data: RunData, recipe: Recipe, device: torch.device, batch_size: int, *,
                 rank: int = 0, world_size: int = 1, lockstep: bool = False):
    """Evaluation batches of `batch_size` images per process, re-iterable.

    Build it once per run: its first full pass is kept in memory when it fits in EVAL_CACHE_BYTES
    (evaluation transforms are deterministic), so later evaluations of a small set skip decoding.

    With several processes each global batch is split across ranks without padding or repeats, so
    the all-reduced sums count every image exactly once. `lockstep` (FSDP, whose forward is a
    collective) makes every rank yield the same number of batches: a rank whose share ran out runs a
    one-image dummy batch with no labels, which evaluate() does not count.
    """
    spec = vdata.LoaderSpec.evaluation(batch_size * world_size, num_workers=recipe.data.num_workers, seed=recipe.train.seed,
                                       bad_images=recipe.data.bad_images, pin_memory=device.type == "cuda",
                                       cache_bytes=EVAL_CACHE_BYTES, cache=vdata.CacheSpec.of(recipe.data))
    loader = vdata.make_loader(data.eval, data.eval_transform, spec, rank=rank, world_size=world_size, device=device)
    if not lockstep:
        return loader
    dummy = (torch.zeros(1, recipe.model.in_chans, *data.img_size), torch.zeros(0, dtype=torch.int64))
    return Lockstep(loader, dummy)


class Lockstep:
    """Re-iterable: the loader's batches, then dummies up to the longest rank's batch count."""

    def __init__(self, loader: vdata.Loader, dummy: tuple[torch.Tensor, torch.Tensor]):
        self.loader, self.dummy = loader, dummy

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = 0
        for batch in self.loader:
            yield batch
            n += 1
        for _ in range(n, self.loader.batches_per_epoch):
            yield self.dummy


FEWSHOT_SEEDS = [0]  # the K-shot images are a fixed choice, so evaluations compare


def fewshot_set(data: RunData, recipe: Recipe, device: torch.device, batch_size: int) -> FewshotSet | None:
    """The training images few-shot evaluation fits on, with the eval transform; None without labels or shots."""
    shots = fewshot_shots(recipe)
    num_classes = len(data.class_names)
    if not shots or num_classes == 0 or getattr(data.train, "multilabel", False):  # few-shot fits one class per image
        return None
    # a streamed split: its first shards, read until every class has enough images
    train = vdata.first_images(data.train, max(shots)) if vdata.is_streamed(data.train) else data.train.dataset
    labels = vdata.label_array(train)
    index = needed_images(labels, num_classes, shots, FEWSHOT_SEEDS)
    chosen = vdata.ImageSet(train.select(index, keep_in_memory=True), num_classes,
                            data.class_names, data.train.name, f"{data.train.split}[few-shot]")
    spec = vdata.LoaderSpec.evaluation(batch_size, bad_images=recipe.data.bad_images, cache_bytes=EVAL_CACHE_BYTES)
    loader = vdata.make_loader(chosen, data.eval_transform, spec, device=device)
    return FewshotSet(loader, index, labels, data.train.num_classes, shots, FEWSHOT_SEEDS)


def knn_set(data: RunData, recipe: Recipe, device: torch.device, batch_size: int) -> NeighbourSet | None:
    """The training split with the eval transform, the neighbours of k-NN evaluation (objective.knn); None
    when not asked, or without labels. A streamed split offers its first images, up to 100 per class."""
    k, num_classes = recipe.objective.knn, len(data.class_names)
    if k is None or num_classes == 0 or getattr(data.train, "multilabel", False):
        return None
    train = vdata.first_images(data.train, KNN_STREAMED_PER_CLASS) if vdata.is_streamed(data.train) else data.train.dataset
    images = vdata.ImageSet(train, num_classes, data.class_names, data.train.name, f"{data.train.split}[k-NN]")
    spec = vdata.LoaderSpec.evaluation(batch_size, num_workers=recipe.data.num_workers, bad_images=recipe.data.bad_images,
                                       cache_bytes=EVAL_CACHE_BYTES, cache=vdata.CacheSpec.of(recipe.data))
    return NeighbourSet(vdata.make_loader(images, data.eval_transform, spec, device=device), k, num_classes)


KNN_STREAMED_PER_CLASS = 100

