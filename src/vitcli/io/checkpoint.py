"""Checkpoints that survive a kill at any instant.

Layout of a run's `checkpoints/` folder:

    step-00000450/model.safetensors   weights used for evaluation (EMA weights when EMA is on),
                                      with the model config, class names and normalisation as metadata
    step-00000450/state.pt            training state (optimizer, step, epoch, RNG, raw weights under
                                      EMA), read back with torch.load(weights_only=True)
    last -> step-00000450             symlinks, swapped atomically
    best -> step-00000400

Under train.strategy fsdp a step directory holds `sharded/` (model + optimizer state written by
every rank through torch.distributed.checkpoint) and `state.pt` (no weights); `vit consolidate`
(and the end of the run, for `best`) adds model.safetensors.

A checkpoint directory is written under a temporary name, every file fsynced, then renamed into
place, so a reader never sees half of one. Resuming scans the step directories newest first and
takes the first that loads, so a corrupted newest one costs only the steps since the one before.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vitcli.errors import VitError, path_error
from vitcli.io.paths import atomic_write, write_through
from vitcli.io.rundir import STATE, WEIGHTS, StepDir, is_sharded, step_dir_name, step_dirs

META_KEY = "vitcli"


@dataclass
class LoadedStep:
    """A step directory whose files all load: its weights ({} when sharded), metadata and training state."""

    path: Path
    step: int
    weights: dict[str, torch.Tensor]
    meta: dict[str, Any]
    state: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


@contextlib.contextmanager
def safetensors_os_errors(path: Path) -> Iterator[None]:
    """safetensors' I/O failures (a full disk reads "... (os error 28)") raised as the OSError they are."""
    try:
        yield
    except SafetensorError as e:
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from e


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    with safetensors_os_errors(path):
        save_file(tensors, str(path), metadata=metadata)


def save_state(state: dict[str, Any], path: Path) -> None:
    """torch.save(state, path), with an OSError (a full disk) raised as one."""
    write_through(path, lambda f: torch.save(state, f))


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any], what: str = "") -> None:
    """Write a .safetensors file atomically (fsynced), with `meta` as JSON in its header."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}

    def write(tmp: Path) -> None:
        write_safetensors(tensors, tmp, metadata={META_KEY: json.dumps(meta)})
        _fsync_file(tmp)

    atomic_write(path, write, what)
    _fsync_dir(Path(path).expanduser().parent)


def staging_dir(root: Path, step: int) -> Path:
    """A temporary step directory with a name every rank can compute (for sharded checkpoints)."""
    return root / f".tmp-{step_dir_name(step)}-shared"


def save_checkpoint(
    root: Path,
    step: int,
    weights: dict[str, torch.Tensor] | None,
    meta: dict[str, Any],
    state: dict[str, Any],
    *,
    is_best: bool,
    keep: int,
    staged: Path | None = None,
) -> StepDir:
    """Write step-N/ (weights + state) atomically, point `last` (and `best`) at it, prune old ones.

    `weights` None writes no model.safetensors; `staged` is a temporary directory other processes
    already wrote into (e.g. sharded state), which becomes the step directory.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = staged or root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
    if staged is None:
        shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(exist_ok=staged is not None)
        names = [STATE]
        if weights is not None:
            write_safetensors({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / WEIGHTS,
                              metadata={META_KEY: json.dumps(meta)})
            names.append(WEIGHTS)
        save_state(state, tmp / STATE)
        for name in names:
            _fsync_file(tmp / name)
        for sub in tmp.iterdir():
            if sub.is_dir():
                _fsync_dir(sub)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a final save right after an eval)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        _point(root, "last", final)
        if is_best:
            _point(root, "best", final)
    except BaseException as e:  # a full disk, Ctrl-C ...: no half-written step folder stays behind
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise path_error(e, root, f"the checkpoint of step {step} in") from e
        raise
    _prune(root, keep)
    return StepDir(final, step)


def _point(root: Path, name: str, target: Path) -> None:
    link = root / name
    tmp = root / f".{name}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)
    os.symlink(target.name, tmp)
    os.replace(tmp, link)


def _prune(root: Path, keep: int) -> None:
    """Keep the newest `keep` step directories besides whatever last/best point at."""
    pinned = {(root / n).resolve() for n in ("last", "best") if (root / n).exists()}
    steps = sorted(step_dirs(root), key=lambda c: c.step, reverse=True)
    extra = [c for c in steps if c.path.resolve() not in pinned]
    for c in extra[keep:]:
        shutil.rmtree(c.path, ignore_errors=True)


def read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load a .safetensors file and its vitcli metadata ({} for foreign files)."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise VitError(f"Checkpoint {path} cannot be read ({e}). It may be truncated or not a .safetensors file.") from e
    try:
        meta = json.loads(raw) if raw else {}
    except json.JSONDecodeError as e:
        raise VitError(f"Checkpoint {path} has corrupt metadata ({e}).") from e
    return tensors, meta


def read_state(path: Path) -> dict[str, Any]:
    """Training state, loaded without running any code from the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated zip, a foreign pickle that weights_only refuses, ...
        raise VitError(f"Training state {path} cannot be loaded safely ({type(e).__name__}: {str(e).splitlines()[0][:200]}).") from e


def newest_loadable(root: Path, warn=print) -> LoadedStep | None:
    """The newest step directory whose weights and state both load; broken ones are reported."""
    for found in sorted(step_dirs(root), key=lambda c: c.step, reverse=True):
        try:
            state = read_state(found.path / STATE)
            if state.get("sharded"):  # weights and optimizer live in sharded/ (read by the trainer)
                if not is_sharded(found.path):
                    raise VitError("its sharded/ folder is missing or incomplete")
                weights, meta = {}, state.get("meta", {})
            else:
                weights, meta = read_weights(found.path / WEIGHTS)
        except VitError as e:
            warn(f"Skipping checkpoint {found.path.name}: {e}")
            continue
        if state.get("step") != found.step:
            warn(f"Skipping checkpoint {found.path.name}: its state says step {state.get('step')}.")
            continue
        return LoadedStep(found.path, found.step, weights, meta, state)
    return None
