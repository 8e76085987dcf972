"""How the recipe's global batch maps onto processes, micro-batches, steps and epochs (the one place)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vitcli.errors import VitError
from vitcli.recipe import TrainCfg

MAX_EVAL_BATCH = 1024


@dataclass
class StepPlan:
    micro_batch: int  # images per process and forward pass
    accum: int  # micro-batches per optimizer step and process
    steps_per_epoch: int
    total_steps: int
    eval_every: int

    @property
    def eval_batch(self) -> int:
        """Images per process and evaluation forward pass (no gradients: twice the micro-batch)."""
        return min(self.micro_batch * 2, MAX_EVAL_BATCH)

    @classmethod
    def make(cls, t: TrainCfg, num_train: int, world_size: int = 1) -> StepPlan:
        micro = t.micro_batch_size or max(1, t.batch_size // world_size)
        if t.batch_size % (micro * world_size):
            raise VitError(f"train.batch_size ({t.batch_size}) must be a multiple of micro_batch_size x processes ({micro} x {world_size}).")
        accum = t.batch_size // (micro * world_size)
        # an unknown size (streamed shards by pattern, with train.steps): the run is one nominal epoch
        steps_per_epoch = num_train // t.batch_size if num_train or t.steps is None else t.steps
        if steps_per_epoch == 0:
            raise VitError(f"train.batch_size ({t.batch_size}) is larger than the training set ({num_train} images). Lower it with --set train.batch_size=N.")
        total = t.steps if t.steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))
        return cls(micro, accum, steps_per_epoch, total, t.eval_every or steps_per_epoch)

    def epoch(self, step: int) -> float:
        return step / self.steps_per_epoch
