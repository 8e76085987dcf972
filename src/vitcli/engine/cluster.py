"""This process's place in a torchrun run, and the few collectives the engine needs.

`init` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and starts the process group: NCCL on
cuda:LOCAL_RANK, gloo on the CPU. Without those variables this is rank 0 of 1 and every collective
here is a no-op, so the engine calls them unconditionally.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from vitcli.engine.runtime import pick_device
from vitcli.errors import VitError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run. One process without torchrun: rank 0 of 1, inactive."""

    device: torch.device
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def active(self) -> bool:
        """A process group is up (under torchrun, even with one process)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        if not self.active:
            return str(self.device)
        kind = f"{self.device.type} x{self.world_size}" if self.device.type == "cuda" else "cpu"
        return f"{self.world_size} processes ({kind}, {self.backend})"

    def say(self, print_fn: Callable[..., Any]) -> Callable[..., Any]:
        """print_fn on rank 0; a function that prints nothing on the other ranks."""
        return print_fn if self.is_main else _quiet


def _quiet(*args, **kwargs) -> None:
    """What ranks other than 0 print: nothing."""


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def init(device_name: str) -> DistEnv:
    """Start (or join the already started) process group when torchrun launched us."""
    device = pick_device(device_name)
    if not launched_by_torchrun():
        return DistEnv(device)
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise VitError(
                f"torchrun started local rank {local} but this machine has {torch.cuda.device_count()} GPU(s). "
                f"Pass --nproc_per_node={torch.cuda.device_count()} (or fewer)."
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
        atexit.register(_shutdown)
    return DistEnv(device, rank, local, world, backend)


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.active:
        dist.barrier()


def on_main(env: DistEnv, fn: Callable[[], T]) -> T:
    """Run fn on rank 0 only and hand its result to every rank (file-system side effects stay on one).

    An exception on rank 0 reaches the other ranks too, so they stop with the same message.
    """
    if not env.active:
        return fn()
    box: list[Any] = [None]
    if env.is_main:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # noqa: BLE001 -- re-raised below, on every rank
            try:
                pickle.dumps(e)
            except Exception:  # noqa: BLE001 -- an exception that cannot travel: send its text
                e = RuntimeError(f"{type(e).__name__}: {e}")
            box[0] = ("error", e)
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


@contextlib.contextmanager
def main_first(env: DistEnv):
    """Rank 0 runs the block first (downloads, dataset cache preparation), the others after it."""
    if not env.is_main:
        barrier(env)
    yield
    if env.is_main:
        barrier(env)


def all_gather(env: DistEnv, obj: T) -> list[T]:
    if not env.active:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def agree(env: DistEnv, loss_sum: torch.Tensor, stop: bool) -> tuple[torch.Tensor, bool]:
    """One small all-reduce per step: the mean loss over ranks, and whether any rank was asked to stop
    (a signal reaches each rank at a different moment; all must save and stop at the same step)."""
    if not env.active:
        return loss_sum, stop
    both = torch.stack([loss_sum.detach().float(), torch.tensor(float(stop), device=loss_sum.device)])
    dist.all_reduce(both)
    return both[0] / env.world_size, bool(both[1] > 0)


def local_value(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (replicated) DTensor, e.g. FSDP's gradient norm."""
    full = getattr(x, "full_tensor", None)
    return full() if callable(full) else x
