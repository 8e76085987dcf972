"""Sharded checkpoints (train.strategy fsdp): model and optimizer state written by every process with
torch.distributed.checkpoint (DCP), which reshards on load, so a run saved by N processes resumes on M.

`consolidate_checkpoint` turns the sharded weights into one .safetensors, in one process. Everything
here also works without a process group (`distributed=False`): DCP then reads or writes alone.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import torch

from vitcli.errors import VitError
from vitcli.io.checkpoint import read_state, save_weights
from vitcli.io.paths import writable_file
from vitcli.io.rundir import SHARDED, STATE, WEIGHTS, is_sharded, linked_checkpoint


@contextlib.contextmanager
def _one_process_ok():
    """DCP warns whenever it runs without a process group, even when asked to (no_dist=True)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, distributed: bool) -> None:
    """All ranks write their shards of model + optimizer state into folder (a collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, optimizer)
    with _one_process_ok():
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=str(folder), no_dist=not distributed)


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *, distributed: bool) -> None:
    """Fill model + optimizer from a DCP folder written by any number of processes, under any strategy
    (FSDP shards, DDP replicas and a single process all ask DCP for their own part)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    msd, osd = get_state_dict(model, optimizer)
    try:
        with _one_process_ok():
            dcp.load({"model": msd, "optimizer": osd}, checkpoint_id=str(folder), no_dist=not distributed)
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


def sharded_step_dir(path: Path) -> Path:
    """The sharded step directory a path stands for: a run (its best, else last, checkpoint), its
    checkpoints/ folder, or a step directory itself."""
    path = Path(path)
    found = linked_checkpoint(path, is_sharded)
    if found is not None:
        return found[1].resolve()
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

    step_dir = sharded_step_dir(path)
    out = writable_file(Path(out) if out is not None else step_dir / WEIGHTS, "--out")  # before reading the shards
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
    weights = {k.removeprefix("model."): v for k, v in tensors.items()}
    if any(k.startswith("model.") for k in weights):  # an mpp / mae objective's shards: keep its encoder
        weights = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    save_weights(out, weights, state.get("meta", {}), "--out")
    return out
