"""Training batches streamed from tar shards, split over ranks and loader workers, resumable at the next sample.

Who reads what. There are K = ranks x workers readers; reader k = rank x workers + worker.
- Epoch e orders the split's shards by a permutation seeded from (seed, e), the same on every rank;
  reader k takes every K-th shard of it from the k-th on, and reads each from its first sample to its
  last. Each reader's epochs follow each other without a pause: a reader that runs out of its shards
  goes on with its shards of epoch e + 1.
- Each reader passes its samples through the shuffle buffer of data.sample_stream (a hash of (seed, k, j)
  draws); the buffer carries on across shards and epochs, as WebDataset's does.
- A sample is augmented from (seed, the epoch it was read in, its shard's number in the split, its place
  in the shard): the same however it is batched, whichever worker or rank reads it, after a resume too.
- A rank's loader takes its workers' batches in turn (torch's DataLoader), `batch_size` samples each.

The guarantee. When the shards divide evenly over the K readers and hold equal counts, every reader
reads epoch e's shards while the run takes the steps of epoch e: by the end of them every sample of the
epoch has been read exactly once and emitted, except the K x buffer still waiting in the buffers,
which come out early in epoch e + 1. When they do not divide evenly, readers with fewer or shorter
shards start their next epoch sooner: within a nominal epoch a sample is read at most twice or not at all,
and over E epochs the counts differ by at most one shard's worth per reader. (A class-balanced stream,
data.balance: sampler, emits draws with replacement from the buffer instead: see data.sample_stream.)

Exact resume. A reader's state (epoch, shard, byte offset of the next sample, draws so far, and the
buffer as references: shard, byte offset and place of each waiting sample) is what `state_dict` returns;
torchdata's StatefulDataLoader keeps it per worker at the last batch the rank consumed. Loading it, a
reader fetches its buffered samples by offset and reads on from the next sample: nothing consumed is
read again and the batches are those an uninterrupted run takes. This holds with the same number of
readers (ranks x workers); with another number, the run restarts the interrupted epoch (see StreamLoader).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from vitcli.data.sample_stream import BufferedStream, Unusable, Waiting
from vitcli.data.tarshards import ShardError, open_shard, read_samples
from vitcli.rng import derive_seed


def shard_order(num_shards: int, seed: int, epoch: int) -> list[int]:
    """Epoch `epoch`'s order of the split's shards (the same on every rank and worker)."""
    return torch.randperm(num_shards, generator=torch.Generator().manual_seed(derive_seed(seed, epoch, 1))).tolist()


class ShardStream(BufferedStream):
    """One rank's endless stream of collated Batches from the tar shards `urls` (see the module docstring)."""

    def __init__(self, urls: list[str], *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.urls = urls

    def _fresh(self, reader: int) -> dict[str, Any]:
        return {"reader": reader, "readers": self.readers, "epoch": self.start_epoch, "shard": 0, "offset": 0,
                "place": 0, "draws": 0, "buffer": []}

    def _where(self, w: Waiting) -> str:
        return f"{self.urls[w.source]}:{w.sample.key}"

    def _read(self, reader: int, state: dict) -> Iterator[Waiting | Unusable]:
        """Endless samples from this reader's shards, epoch after epoch; the state advances in place."""
        while True:
            mine = shard_order(len(self.urls), self.seed, state["epoch"])[reader::self.readers]
            while state["shard"] < len(mine):
                shard = mine[state["shard"]]
                url = self.urls[shard]
                try:
                    for sample in read_samples(url, state["offset"]):
                        place = state["place"]
                        state["offset"], state["place"] = sample.end, place + 1
                        yield self._checked(sample, Waiting(state["epoch"], shard, sample.offset, place, sample),
                                            f"{sample.key} of shard {url}")
                except ShardError as e:
                    yield Unusable(str(e), " (the rest of the shard is skipped)")
                state["shard"], state["offset"], state["place"] = state["shard"] + 1, 0, 0
            state["epoch"], state["shard"] = state["epoch"] + 1, 0

    def _restore(self, reader: int, state: dict[str, Any]) -> list[Waiting]:
        """The buffered samples read back by offset (one open file per shard, in offset order: one forward
        pass over the file's read-ahead); reading goes on from the state's shard and offset."""
        buffer = [Waiting.from_ref(ref) for ref in state["buffer"]]
        for shard in sorted({w.source for w in buffer}):
            with open_shard(self.urls[shard]) as f:
                for w in sorted((w for w in buffer if w.source == shard), key=lambda w: w.offset):
                    w.sample = next(read_samples(self.urls[shard], w.offset, limit=1, file=f))
        return buffer
