"""Peak memory of a step: the most tensor memory alive at once, the model's own share only.

CUDA: `torch.cuda.max_memory_allocated` over the timed rounds, minus what other contestants (the other
model of `--compare`) hold resident, so each model is charged for its parameters, gradients, optimizer
state, inputs and activations only.

CPU: PyTorch keeps no allocation statistics for host memory, and process RSS (getrusage maxrss) only
rises, so it cannot separate two models nor see a second step; tracemalloc sees Python objects, not
tensors. We run one eager step under `torch.distributed._tools.mem_tracker.MemTracker`, which follows
every tensor storage created (a dispatch mode), plus the model, optimizer and inputs passed to it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from vitcli.bench.steps import ModelUnderTest

CPU_METHOD = "tensor bytes alive at the peak of one eager step (torch MemTracker)"
CUDA_METHOD = "torch.cuda.max_memory_allocated during the timed steps, less other models' resident memory"


def cpu_step_peak(mut: ModelUnderTest) -> int | None:
    """Peak tensor bytes of one eager step of mut (run once more here), or None if it cannot be tracked."""
    try:
        from torch.distributed._tools.mem_tracker import MemTracker
    except Exception:  # noqa: BLE001 -- a torch without distributed, or the private tool moved
        return None
    try:
        tracker = MemTracker()
        extra = [mut.optimizer] if mut.optimizer is not None else []
        tracker.track_external(mut.model, *extra, *mut.input_tensors)
        with tracker:
            mut.eager_step()
        snapshot = tracker.get_tracker_snapshot("peak")
        return int(sum(per_device.get("Total", 0) for per_device in snapshot.values()))
    except Exception:  # noqa: BLE001 -- memory is a side figure; never fail the benchmark over it
        return None


class CudaPeak:
    """Hooks for a contestant's rounds: each round's peak allocation, less memory held by others."""

    def __init__(self, device: torch.device, resident_bytes: Callable[[], int]):
        self.device, self.resident_bytes = device, resident_bytes
        self.others = 0
        self.peak = 0

    def before_round(self) -> None:
        torch.cuda.synchronize(self.device)
        self.others = torch.cuda.memory_allocated(self.device) - self.resident_bytes()
        torch.cuda.reset_peak_memory_stats(self.device)

    def after_round(self) -> None:
        self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device) - self.others)
