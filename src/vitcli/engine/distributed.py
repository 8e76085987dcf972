"""Running under torchrun: one process per device, DDP or FSDP2, rank 0 speaks for the run.

- `init` reads torchrun's RANK / WORLD_SIZE / LOCAL_RANK and starts the process group: NCCL on
  cuda:LOCAL_RANK, gloo on the CPU. Without those variables everything here is a no-op.
- `wrap` turns the model into what the loop trains: DDP (gradients all-reduced once per optimizer
  step; `accumulating` skips the sync on the other micro-steps) or FSDP2 (`fully_shard` on every
  block, then on the root), with optional activation checkpointing of every block.
- Checkpoints: DDP replicas are identical, so rank 0 writes the usual files. FSDP writes model and
  optimizer state sharded with torch.distributed.checkpoint (DCP), which reshards on load, so a run
  saved by N processes resumes on M. `consolidate` turns the sharded weights into one .safetensors.
- RNG: every rank's generator state is saved; a resume on the same number of processes restores each
  rank's own, on another number each rank is re-seeded from (seed, step, rank). Data order and
  augmentation never depend on this: they are seeded per image (see vitcli.data.loader).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import pickle
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np
import torch
import torch.distributed as dist

from vitcli.engine.runtime import pick_device, rng_state, seed_everything, set_rng_state
from vitcli.errors import VitError

SHARDED = "sharded"  # the DCP folder inside an FSDP checkpoint's step directory
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


# ---- collectives that are no-ops in one process ------------------------------------------------


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


# ---- model wrapping ----------------------------------------------------------------------------


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Activation checkpointing: every encoder block recomputes its activations in backward.

    The block's forward is wrapped in place (parameter names, and so checkpoints, do not change).
    """
    from torch.utils.checkpoint import checkpoint

    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def wrap(model: torch.nn.Module, strategy: str, env: DistEnv, *, activation_checkpointing: bool):
    """(the module the loop calls, the DDP wrapper or None). `model` itself keeps its parameter
    names; under FSDP its parameters become DTensor shards in place."""
    if activation_checkpointing:
        checkpoint_blocks(model)
    if not env.active:
        return model, None
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model, None
    if env.world_size == 1:
        return model, None
    from torch.nn.parallel import DistributedDataParallel

    ddp = DistributedDataParallel(
        model,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        gradient_as_bucket_view=True,
    )
    return ddp, ddp


def accumulating(ddp, *, last: bool):
    """DDP: skip the gradient all-reduce on every micro-step but the last of an optimizer step.
    (FSDP reduce-scatters every micro-step, which keeps gradients sharded, i.e. small.)"""
    return ddp.no_sync() if ddp is not None and not last else nullcontext()


def grad_scaler(device: torch.device, enabled: bool, sharded: bool):
    if sharded and enabled:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, enabled=True)
    return torch.amp.GradScaler(device.type, enabled=enabled)


# ---- per-rank RNG ------------------------------------------------------------------------------


def _derived_seed(*key: int) -> int:
    return int(np.random.SeedSequence([k % 2**63 for k in key]).generate_state(1, dtype=np.uint64)[0] % 2**63)


def seed_rank(env: DistEnv, seed: int) -> None:
    """Give ranks > 0 their own RNG streams (dropout, drop-path, Mixup draws); rank 0 keeps the
    recipe's seed, so one process is exactly rank 0 of a larger run. Call after building the model
    (every rank builds the same initial weights from the same seed)."""
    if env.rank > 0:
        seed_everything(_derived_seed(seed, env.rank))


def gather_rng(env: DistEnv) -> list[dict]:
    """Every rank's RNG state, in rank order (a collective under torchrun)."""
    mine = rng_state()
    if env.active and env.device.type == "cuda":
        mine["cuda"] = [torch.cuda.get_rng_state(env.device)]  # this process's GPU only
    return all_gather(env, mine)


def restore_rng(state: dict, env: DistEnv, seed: int, say=print) -> None:
    """Each rank's own saved RNG when the number of processes is unchanged; otherwise re-seed."""
    per_rank = state.get("rng_per_rank") or [state["rng"]]
    if len(per_rank) != env.world_size:
        seed_everything(_derived_seed(seed, state["step"], env.rank))
        say(f"The checkpoint was written by {len(per_rank)} process(es), this run has {env.world_size}: data order "
            "and augmentation continue exactly; dropout/drop-path RNG streams are re-seeded from (seed, step, rank).")
        return
    mine = per_rank[env.rank]
    if not env.active:
        set_rng_state(mine)
        return
    mine = dict(mine)
    cuda = mine.pop("cuda", None)
    set_rng_state(mine)
    if cuda is not None and env.device.type == "cuda":
        torch.cuda.set_rng_state(cuda[0], env.device)


# ---- sharded (DCP) checkpoints -----------------------------------------------------------------


@contextlib.contextmanager
def _one_process_ok():
    """DCP warns whenever it runs without a process group, even when asked to (no_dist=True)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded(env: DistEnv, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """All ranks write their shards of model + optimizer state into folder (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    with _one_process_ok():
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(folder), no_dist=not env.active)


def load_sharded(env: DistEnv, folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Fill model + optimizer from a DCP folder written by any number of processes, under any strategy
    (FSDP shards, DDP replicas and a single process all ask DCP for their own part)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    try:
        with _one_process_ok():
            dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=str(folder), no_dist=not env.active)
    except Exception as e:  # noqa: BLE001 -- DCP raises CheckpointException for missing keys, shapes, files
        raise VitError(f"Sharded checkpoint {folder} does not match this model and optimizer ({str(e).splitlines()[0][:300]}).") from e
    set_state_dict(model, optimizer, model_state_dict=msd, optim_state_dict=osd)


def load_full_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """A plain optimizer.state_dict() (keyed by parameter index, full tensors; written by a DDP or
    one-process run) into the optimizer of a sharded model: keyed by name, then sharded by torch."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    by_name = {
        "state": {names[id(params[i])]: s for i, s in saved["state"].items()},
        "param_groups": [{**g, "params": [names[id(params[i])] for i in g["params"]]} for g in saved["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


def is_sharded(step_dir: Path) -> bool:
    return (step_dir / SHARDED / ".metadata").is_file()


def sharded_step_dir(path: Path) -> Path:
    """The sharded step directory a path stands for: a run (its best, else last, checkpoint), its
    checkpoints/ folder, or a step directory itself."""
    path = Path(path)
    for base in (path / "checkpoints", path):
        for link in ("best", "last"):
            if is_sharded(base / link):
                return (base / link).resolve()
    if is_sharded(path):
        return path
    raise VitError(
        f"{path} holds no sharded checkpoint (a step directory with sharded/.metadata, written by "
        "train.strategy: fsdp). Pass a run directory or one of its checkpoints/step-N directories."
    )


def consolidate_checkpoint(path: Path, out: Path | None = None) -> Path:
    """Read the model weights of a sharded checkpoint (in this one process, whatever number of
    processes wrote it) and write them as one .safetensors with vitcli metadata; by default as the
    step directory's model.safetensors, which makes it readable by `vit eval` and `vit finetune`."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from vitcli.engine.checkpoint import STATE, WEIGHTS, read_state, save_weights

    step_dir = sharded_step_dir(path)
    state = read_state(step_dir / STATE) if (step_dir / STATE).is_file() else {}
    reader = FileSystemReader(str(step_dir / SHARDED))
    entries = reader.read_metadata().state_dict_metadata
    tensors = {
        key: torch.empty(tuple(m.size), dtype=m.properties.dtype)
        for key, m in entries.items()
        if key.startswith("model.") and isinstance(m, TensorStorageMetadata)
    }
    with _one_process_ok():
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    out = Path(out) if out is not None else step_dir / WEIGHTS
    save_weights(out, {k.removeprefix("model."): v for k, v in tensors.items()}, state.get("meta", {}))
    return out
