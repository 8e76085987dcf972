"""The main process's side of a stream (tar shards or a streamed Hub set): torchdata's StatefulDataLoader
over a ShardStream or HubStream.

It yields (images, labels) on the device without end, and its `state_dict()` (per rank, taken at the
last batch this rank consumed, whatever the workers had prefetched) goes into the checkpoint.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any, Callable, Optional

import datasets
import numpy as np
import torch

from vitcli.data.batches import Batch
from vitcli.data.hub_stream import HubSet, HubStream
from vitcli.data.loader import Delivery
from vitcli.data.specs import LoaderSpec
from vitcli.data.sample_stream import BufferedStream, StreamedSet
from vitcli.data.shard_sets import ShardSet, labelled_cells
from vitcli.data.shard_stream import ShardStream
from vitcli.data.tensor_transforms import TensorTransform
from vitcli.errors import VitError
from vitcli.rng import derive_seed

# torchdata 0.11 calls a torch API deprecated since (torch.set_vital) each time a loader starts
warnings.filterwarnings("ignore", message="'set_vital' is deprecated")

FEWSHOT_READ = 64  # few-shot evaluation reads at most this x K x classes samples of a stream for its K a class


def is_streamed(train: Any) -> bool:
    return isinstance(train, StreamedSet)


def _keep_batch(batch: Batch) -> Batch:
    return batch  # the stream already collates; module-level so worker processes can pickle it


class StreamLoader(Delivery):
    """Endless (images, labels) on `device`; `skipped` counts samples dropped under bad_images: skip."""

    def __init__(self, stream: BufferedStream, num_workers: int, device: torch.device, pin_memory: bool):
        from torchdata.stateful_dataloader import StatefulDataLoader

        self.stream, self.device = stream, device
        self.dataloader = StatefulDataLoader(
            stream, batch_size=None, num_workers=num_workers, collate_fn=_keep_batch, pin_memory=pin_memory,
            snapshot_every_n_steps=1,  # every batch carries its worker's state: resume at the exact batch
            generator=torch.Generator().manual_seed(derive_seed(stream.seed, stream.rank)),
        )
        self.skipped = 0
        self.skipped_examples: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        return {"readers": self.stream.readers, "loader": self.dataloader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> bool:
        """Restore the position; False (nothing restored) when it was saved with another number of readers."""
        if state.get("readers") != self.stream.readers:
            return False
        self.dataloader.load_state_dict(state["loader"])
        return True

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s = self.stream
        return self._delivered(s.transform, s.bad_images, s.name, s.split)


def first_images(train: StreamedSet, shots: int) -> datasets.Dataset:
    """Enough of a streamed training split for K-shot evaluation: read from its start until every class
    has `shots` images, or FEWSHOT_READ x shots x classes samples were read."""
    if isinstance(train, ShardSet):
        cells = labelled_cells(train)
    else:
        cells = ((e["image"], int(e["label"])) for e in train.dataset if e.get("image") and e.get("label") is not None)
    rows: dict[str, list] = {"image": [], "label": []}
    counts = np.zeros(max(1, train.num_classes), dtype=np.int64)
    for i, (cell, label) in enumerate(cells):
        if 0 <= label < len(counts):
            rows["image"].append(cell)
            rows["label"].append(label)
            counts[label] += 1
        if counts.min() >= shots or i + 1 >= FEWSHOT_READ * shots * len(counts):
            break
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict(rows, features=features)


def make_stream_loader(train: StreamedSet, transform: Callable, spec: LoaderSpec, *, epoch: int = 0, buffer: int = 1000,
                       rank: int = 0, world_size: int = 1, device: Optional[torch.device] = None) -> StreamLoader:
    """This rank's loader of spec.batch_size images per batch (here: the global batch / world_size) from a
    stream; a stream always shuffles (through `buffer`) and keeps its last, partial batch."""
    device = torch.device(device or "cpu")
    num_workers, batch_size = spec.num_workers, spec.batch_size
    readers = world_size * max(1, num_workers)
    on_device = (device.type == "cuda" if spec.decode_on_device is None else spec.decode_on_device) and \
        isinstance(transform, TensorTransform)
    common = dict(seed=spec.seed, epoch=epoch, buffer=buffer, rank=rank, world_size=world_size, num_workers=num_workers,
                  bad_images=spec.bad_images, decode_on_device=on_device, name=train.name, split=train.split,
                  labels=train.num_classes > 0, multi_hot=train.num_classes if getattr(train, "multilabel", False) else None,
                  balanced=spec.balanced and train.num_classes > 0)
    target = train.sample_target()
    if target is not None:  # segmentation, detection: masks or objects instead of labels
        common.update(labels=False, target=target)
    if isinstance(train, HubSet):
        stream: BufferedStream = HubStream(train.dataset, transform, batch_size, **common)
    else:
        if len(train.urls) < readers:
            raise VitError(
                f"{len(train.urls)} shard(s) cannot feed {readers} readers ({world_size} process(es) x {max(1, num_workers)} "
                "loader worker(s)): every reader needs shards of its own. Write more, smaller shards "
                "(vit shards --samples-per-shard N) or use fewer workers (data.num_workers)."
            )
        stream = ShardStream(train.urls, transform, batch_size, **common)
    return StreamLoader(stream, num_workers, device, torch.cuda.is_available() if spec.pin_memory is None else spec.pin_memory)
