"""A Hub set streamed (`data.streaming: true`): `datasets.load_dataset(..., streaming=True)`, split over
ranks with `datasets.distributed.split_dataset_by_node` and over loader workers by `datasets` itself,
shard order shuffled per epoch (`IterableDataset.shuffle` with a buffer of one and `set_epoch`), then
the shuffle buffer of data.sample_stream.

Exact resume without random access. A streamed set cannot fetch a sample by position, and `datasets`'
own `state_dict()` drops the content of its shuffle buffer. So each reader records `datasets`' state
every SNAPSHOT_EVERY samples; its saved position holds the newest record at or before its oldest
buffered sample, the buffer as read counts, and the current read count. Resuming, it restarts the
stream at that record and reads forward to the current position, keeping the buffered samples: the
resumed batches are exactly an uninterrupted run's. The price is re-reading (not re-emitting) the span
the buffer covers, about buffer x ln(buffer) samples (7,000 for 1,000). Local sets (an image folder or a
save_to_disk copy) stream the same way through `Dataset.to_iterable_dataset`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
from datasets.distributed import split_dataset_by_node

from vitcli.data.sample_stream import BufferedStream, StreamedSet, Unusable, Waiting
from vitcli.data.tarshards import Sample
from vitcli.errors import VitError

SNAPSHOT_EVERY = 64
LOCAL_SHARDS = 64  # a local set streamed is cut into this many shards (at most one per image)


@dataclass
class HubSet(StreamedSet):
    """A training split streamed through `datasets` (columns image, with decode off, and label)."""

    dataset: datasets.IterableDataset = field(kw_only=True)


def streamed(image_set_or_hub: Any, *, num_samples: Optional[int] = None) -> HubSet:
    """A HubSet from a map-style ImageSet (a local folder or save_to_disk copy) or from a Hub IterableDataset
    already standardised to image/label columns (sources.stream_hub)."""
    ds, counts, classes = image_set_or_hub.dataset, None, image_set_or_hub.num_classes
    if isinstance(ds, datasets.Dataset):
        if classes and not getattr(image_set_or_hub, "multilabel", False):  # a local set knows its class counts
            counts = np.bincount(np.asarray(ds["label"], dtype=np.int64), minlength=classes).tolist()
        ds = ds.to_iterable_dataset(num_shards=max(1, min(LOCAL_SHARDS, len(ds))))
        num_samples = len(image_set_or_hub.dataset)
    ds = ds.cast_column("image", datasets.Image(decode=False))
    return HubSet(num_samples, classes, list(image_set_or_hub.class_names), image_set_or_hub.name,
                  image_set_or_hub.split, dataset=ds, class_counts=counts)


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """`datasets` warns at every load_state_dict that a shuffle buffer is refilled: ours is one sample."""
    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


class HubStream(BufferedStream):
    """One rank's endless stream of collated Batches from a streamed set (see the module docstring)."""

    def __init__(self, dataset: datasets.IterableDataset, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if dataset.n_shards < self.world_size * self.workers:
            raise VitError(
                f"The streamed set has {dataset.n_shards} shard(s), fewer than its {self.readers} readers "
                f"({self.world_size} process(es) x {self.workers} loader worker(s)). Use fewer workers (data.num_workers)."
            )
        self.dataset = split_dataset_by_node(dataset.shuffle(seed=self.seed, buffer_size=1), self.rank, self.world_size)
        self._it: Optional[Iterator[dict]] = None
        self._snapshots: list[list] = []  # [epoch, read, datasets' state (None: the epoch's start)]

    def _fresh(self, reader: int) -> dict[str, Any]:
        return {"reader": reader, "readers": self.readers, "epoch": self.start_epoch, "read": 0, "draws": 0,
                "buffer": [], "snapshot": None}

    def _where(self, w: Waiting) -> str:
        return f"{self.name} ({self.split}), sample {w.place} of reader {w.source} in epoch {w.epoch}"

    def _epoch(self, epoch: int, state: Optional[dict] = None) -> Iterator[dict]:
        self.dataset.set_epoch(epoch)  # reshuffles the shard order
        if state is not None:
            with _quiet_datasets():
                self.dataset.load_state_dict(state)
        return iter(self.dataset)

    def _saved(self, state: dict, buffer: list[Waiting]) -> dict[str, Any]:
        """The position, with the newest snapshot from which replaying reaches every buffered sample."""
        oldest = min(((w.epoch, w.offset) for w in buffer), default=(state["epoch"], state["read"]))
        usable = [s for s in self._snapshots if (s[0], s[1]) <= oldest]
        self._snapshots = self._snapshots[len(usable) - 1:] if usable else self._snapshots  # older ones are no longer needed
        return {**state, "buffer": [w.ref() for w in buffer], "snapshot": usable[-1] if usable else state.get("snapshot")}

    def _restore(self, reader: int, state: dict[str, Any]) -> list[Waiting]:
        buffer = [Waiting.from_ref(ref) for ref in state["buffer"]]
        epoch, read, saved = state["snapshot"] or (state["epoch"], 0, None)
        self._snapshots = [[epoch, read, saved]]
        it = self._epoch(epoch, saved)
        wanted = {(w.epoch, w.offset): w for w in buffer}
        while (epoch, read) != (state["epoch"], state["read"]):  # replay: keep the buffered, drop the consumed
            example = next(it, None)
            if example is None:
                epoch, read, it = epoch + 1, 0, self._epoch(epoch + 1)
                continue
            if (epoch, read) in wanted:
                wanted[epoch, read].sample = self._sample(example, read)
            read += 1
        self._it = it
        return buffer

    def _read(self, reader: int, state: dict) -> Iterator[Waiting | Unusable]:
        while True:
            if state["read"] % SNAPSHOT_EVERY == 0:
                self._snapshots.append([state["epoch"], state["read"], self.dataset.state_dict() if state["read"] else None])
            example = next(self._it, None)
            if example is None:
                if state["read"] == 0:
                    yield Unusable(f"Reader {reader} of the streamed set {self.name} got no samples in epoch "
                                   f"{state['epoch']}: it has fewer shards than readers. Use fewer workers.", fatal=True)
                    return
                state["epoch"], state["read"] = state["epoch"] + 1, 0
                self._it = self._epoch(state["epoch"])
                continue
            place = state["read"]
            state["read"] += 1
            sample = self._sample(example, place)
            yield self._checked(sample, Waiting(state["epoch"], reader, place, place, sample),
                                f"{place} of the streamed set {self.name}")

    @staticmethod
    def _sample(example: dict, place: int) -> Sample:
        cell = example.get("image") or {}
        data = cell.get("bytes")
        if data is None and cell.get("path"):
            try:
                data = Path(cell["path"]).read_bytes()
            except OSError as e:
                return Sample(str(place), place, None, None, None, f"its image {cell['path']} cannot be read ({e})")
        label = example.get("label")
        return Sample(str(place), place, data, None, None if label is None else int(label),
                      None if data is not None else "it has no image")
