"""A stream's shuffle buffer, batching and resumable state, whatever it reads (tar shards, a streamed Hub set).

A reader (one loader worker of one rank; K = ranks x workers readers) reads its samples in an order its
subclass defines and passes them through a shuffle buffer of `buffer` samples: once the buffer is full,
every sample read takes the place of one drawn uniformly from it, which is emitted. Draw j of reader k is
a hash of (seed, k, j), so a resumed reader continues the same sequence from its draw count. A sample is
augmented from (seed, epoch it was read in, its source number, its place there). Batches of `batch_size`
emitted samples are collated in the worker; `state_dict()` is the reader's position after its last batch,
with the buffer as references, which the subclass turns back into samples on `load_state_dict`.

Class-balanced (data.balance: sampler). Once the buffer is full, each sample read emits one drawn with
replacement from the buffer: a class uniformly among those the buffer holds, then one of its samples
uniformly; the sample read then takes the place of one drawn uniformly (which may be the one emitted).
Each class thus fills about 1 / C of the stream while the buffer holds every class (a buffer many times the
number of classes), at the price of the once-per-epoch guarantee: rare classes' samples come out several
times while they wait, common ones' may never. A sample emitted again is augmented afresh (its copy number
joins its augmentation key), and the copies are part of the saved buffer, so resume stays exact.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import datasets
import torch

from vitcli.data.batches import FIX, BadImages, Batch
from vitcli.data.collate import build_batch
from vitcli.data.multilabel import multi_hot
from vitcli.data.tarshards import Sample
from vitcli.rng import derive_seed


@dataclass
class StreamedSet:
    """A training split read as a stream: what describes it, whatever the source (a subclass adds that)."""

    num_samples: Optional[int]  # from the index or data.num_samples; None: unknown (train.steps sets the length)
    num_classes: int
    class_names: list[str]
    name: str
    split: str
    class_counts: Optional[list[int]] = field(default=None, kw_only=True)  # per class, where the source says (shard index)

    def __len__(self) -> int:
        return self.num_samples or 0

    def sample_target(self) -> Optional[SampleTarget]:
        """What a dense task's samples carry beside their images (None: a label, as here)."""
        return None


@dataclass(frozen=True)
class SampleTarget:
    """What a dense task's sample carries beside its image (a mask, a detection's objects): its encoded cell
    from a Sample (None: the sample lacks it), how the cell decodes, and why a sample without it cannot be
    used. Module-level functions only: loader workers pickle it."""

    cell: Callable[[Sample, str], Any]  # (sample, where it came from) -> the encoded target, or None
    decode: Callable[[Any], Any]
    missing: str


@dataclass
class Waiting:
    """A sample in the shuffle buffer, with what is needed to get it back after a resume."""

    epoch: int
    source: int  # the shard's number in the split (tar shards); the reader (a streamed Hub set)
    offset: int  # byte offset in the shard; read count in the epoch (Hub)
    place: int  # in its shard; read count in the epoch (Hub)
    sample: Optional[Sample]  # None until fetched (after a resume)
    copies: int = 0  # times emitted already (class-balanced streams emit a waiting sample again)

    def ref(self) -> list[int]:
        return [self.epoch, self.source, self.offset, self.place] + ([self.copies] if self.copies else [])

    @classmethod
    def from_ref(cls, ref: list[int]) -> Waiting:
        """A buffered sample of a saved state, its sample still to be fetched."""
        return cls(*ref[:4], None, *ref[4:])

    def key(self) -> tuple[int, ...]:
        """What its augmentation is seeded from; a copy emitted again gets its own."""
        return (self.epoch, self.source, self.place) + ((self.copies,) if self.copies else ())


@dataclass
class Unusable:
    """What a reader met instead of a usable sample. The stream stops with it as the error (with the fix),
    or, under data.bad_images: skip, counts it and reads on; `fatal` stops whatever bad_images says."""

    problem: str
    skipped_note: str = ""  # appended to the problem when it is skipped
    fatal: bool = False


def draw(base: int, j: int, n: int) -> int:
    """Draw j of a reader's buffer: uniform in [0, n), a pure function of (base, j) (splitmix64), so a resumed
    reader continues the same sequence from its draw count, at ~1 us rather than a seeded generator's ~80."""
    z = (base + (j + 1) * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) % n


class BufferedStream(torch.utils.data.IterableDataset):
    """One rank's endless stream of collated Batches; subclasses say how samples are read and restored."""

    def __init__(self, transform: Callable, batch_size: int, *, seed: int = 0, epoch: int = 0, buffer: int = 1000,
                 rank: int = 0, world_size: int = 1, num_workers: int = 0, bad_images: BadImages = "error",
                 decode_on_device: bool = False, name: str = "", split: str = "train", labels: bool = True,
                 multi_hot: Optional[int] = None, balanced: bool = False, target: Optional[SampleTarget] = None):
        self.transform, self.batch_size = transform, batch_size
        self.seed, self.start_epoch, self.buffer_size = seed, epoch, max(1, buffer)
        self.rank, self.world_size, self.workers = rank, world_size, max(1, num_workers)
        self.bad_images, self.decode_on_device, self.name, self.split = bad_images, decode_on_device, name, split
        self.labels = labels  # False: samples without a label are fine (self-supervised objectives)
        self.multi_hot = multi_hot  # multi-label samples: their class lists become multi-hot rows this wide
        self.balanced = balanced  # class-balanced draws from the buffer (see the module docstring)
        self.target = target  # dense tasks: samples' masks or objects, decoded and transformed with their images
        self.decoder = datasets.Image()
        self._state: dict[str, Any] | None = None  # the running reader's, after its last batch
        self._restored: dict[str, Any] | None = None

    @property
    def readers(self) -> int:
        return self.world_size * self.workers

    def _reader(self) -> int:
        info = torch.utils.data.get_worker_info()
        return self.rank * self.workers + (info.id if info is not None else 0)

    def state_dict(self) -> dict[str, Any]:
        return dict(self._state or self._fresh(self._reader()))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = dict(state)

    # what a subclass defines
    @abc.abstractmethod
    def _fresh(self, reader: int) -> dict[str, Any]:
        """The state of a reader that has read nothing (at the start epoch)."""

    @abc.abstractmethod
    def _restore(self, reader: int, state: dict[str, Any]) -> list[Waiting]:
        """The buffer of a saved state, its samples read back; reading then goes on from the state's position."""

    @abc.abstractmethod
    def _read(self, reader: int, state: dict) -> Iterator[Waiting | Unusable]:
        """Endless samples, epoch after epoch (or what was met instead of one); the state advances in place."""

    @abc.abstractmethod
    def _where(self, w: Waiting) -> str:
        """Where a sample came from, for messages."""

    def _checked(self, sample: Sample, waiting: Waiting, where: str) -> Waiting | Unusable:
        """The sample, or why it cannot be used (no image, a broken label, no label where labels are needed)."""
        if sample.problem or (sample.label is None and self.labels):
            return Unusable(f"Sample {where} cannot be used: {sample.problem or 'it has no label'}.")
        if self.target is not None and self.target.cell(sample, where) is None:
            return Unusable(f"Sample {where} cannot be used: {self.target.missing}.")
        return waiting

    def _saved(self, state: dict, buffer: list[Waiting]) -> dict[str, Any]:
        return {**state, "buffer": [w.ref() for w in buffer]}

    def __iter__(self) -> Iterator[Batch]:
        reader = self._reader()
        state = self._restored if self._restored and self._restored.get("reader") == reader else self._fresh(reader)
        self._restored = None
        buffer = self._restore(reader, state)
        pending, skipped = [], []
        for item, problems in self._shuffled(reader, state, buffer):
            skipped += problems
            if isinstance(item, str):  # an error to raise in the main process
                yield Batch(None, None, skipped, item)
                return
            if item is None:  # a skipped sample, or one gone into the buffer
                continue
            pending.append(item)
            if len(pending) == self.batch_size:
                batch = self._collate(pending, skipped)
                pending, skipped = [], []
                self._state = self._saved(state, buffer)
                yield batch

    def _collate(self, waiting: list[Waiting], skipped: list[str]) -> Batch:
        labels = [w.sample.label if w.sample.label is not None else ([] if self.multi_hot else 0) for w in waiting]
        if self.multi_hot:
            labels = multi_hot(labels, self.multi_hot)
        if self.target is not None:  # the targets' cells, decoded in build_batch
            labels = [self.target.cell(w.sample, self._where(w)) for w in waiting]
        items = [(w.key(), w.place, {"bytes": w.sample.image, "path": self._where(w)}, label)
                 for w, label in zip(waiting, labels)]
        batch = build_batch(items, self.transform, self.seed, bad_images=self.bad_images,
                            decode_on_device=self.decode_on_device, name=self.name, split=self.split, decoder=self.decoder,
                            decode_target=self.target.decode if self.target is not None else None)
        return batch._replace(skipped=skipped + batch.skipped)

    def _shuffled(self, reader: int, state: dict, buffer: list[Waiting]) -> Iterator[tuple[Any, list[str]]]:
        """(sample to emit, problems skipped) through the buffer, or (error text, []) to stop; the state
        advances in place. Whether an unusable sample stops the run or is skipped is decided here, once."""
        base = derive_seed(self.seed, reader, 2)
        for fresh in self._read(reader, state):
            if isinstance(fresh, Unusable):
                if fresh.fatal or self.bad_images == "error":
                    yield fresh.problem + ("" if fresh.fatal else FIX), []
                    return
                yield None, [fresh.problem + fresh.skipped_note]
                continue
            if len(buffer) < self.buffer_size:
                buffer.append(fresh)
                yield None, []  # nothing to emit yet
                continue
            pick = self._balanced_pick(base, state, buffer) if self.balanced else None
            j = draw(base, state["draws"], len(buffer))
            state["draws"] += 1
            out, buffer[j] = (pick if pick is not None else buffer[j]), fresh
            yield out, []

    @staticmethod
    def _balanced_pick(base: int, state: dict, buffer: list[Waiting]) -> Waiting:
        """A class drawn uniformly among the buffer's, then one of its samples; it stays in the buffer."""
        labels = [w.sample.label for w in buffer]
        classes = sorted(set(labels))
        wanted = classes[draw(base, state["draws"], len(classes))]
        members = [i for i, label in enumerate(labels) if label == wanted]
        chosen = buffer[members[draw(base, state["draws"] + 1, len(members))]]
        state["draws"] += 2
        out = replace(chosen)  # a snapshot: the waiting one counts on
        chosen.copies += 1
        return out
