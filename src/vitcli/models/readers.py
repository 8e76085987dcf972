"""Reading checkpoint files without running code from them: safetensors, torch files (weights_only),
plain-array .npz, and which file a directory (run dir, step dir, Hub snapshot) stands for."""

from __future__ import annotations

import argparse
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitcli.errors import VitError, few_keys
from vitcli.io.rundir import CHECKPOINTS, LINKS, WEIGHTS, has_weights, linked_checkpoint, step_dirs

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".pth.tar")
WRAPPER_KEYS = ("state_dict", "model", "module", "model_ema", "state_dict_ema")  # first found wins
EMA_KEYS = ("model_ema", "state_dict_ema")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
KINDS = "a vitcli run directory, a step-*/ directory, a .safetensors / .pth / .pt / .bin / .npz file, " \
        "a timm or Hugging Face model directory, timm:<model name>[.<tag>] or hf-hub:<org>/<name>"


def file_in_dir(path: Path, notes: list[str]) -> Path:
    """The weights file a directory stands for: run dir -> checkpoints/best (else last) -> model.safetensors."""
    ckpts = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    if ckpts is not path or any((path / link).exists() for link in LINKS) or path.name == CHECKPOINTS:
        found = linked_checkpoint(path, has_weights)
        if found is not None:
            which, step_dir = found
            notes.append(f"using the {which} checkpoint of {path} ({step_dir.resolve().name})")
            return step_dir / WEIGHTS
        steps = sorted(step_dirs(ckpts), key=lambda c: c.step)
        if steps and has_weights(steps[-1].path):
            notes.append(f"{path} has no best/last link; using the newest step directory {steps[-1].path.name}")
            return steps[-1].path / WEIGHTS
        if ckpts is not path:
            raise VitError(f"run directory {path} has no checkpoint yet (nothing in {ckpts}); train until the "
                           "first checkpoint is saved, or pass a weights file")
    for name in HF_WEIGHTS:
        if (path / name).is_file():
            return path / name
    if (path / "model.safetensors.index.json").is_file() or (path / "pytorch_model.bin.index.json").is_file():
        raise VitError(f"{path} holds a sharded checkpoint, which vitcli does not read; merge the shards into "
                       "one model.safetensors (transformers: save_pretrained(..., max_shard_size='100GB'))")
    raise VitError(f"{path} is a directory without a checkpoint (looked for checkpoints/best, checkpoints/last, "
                   f"{', '.join(HF_WEIGHTS)}); pass {KINDS}")


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # torch's weights_only message buries the reason ("Trying to load unsupported GLOBAL ...") mid-text.
    fallback = lines[0] if lines else type(e).__name__
    return next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), fallback)[:300]


def read_torch(path: Path, notes: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A torch file's state dict without running code from it, unwrapped from training checkpoints."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol 4"
            # timm's train.py stores its argparse.Namespace beside the weights; rebuilding one runs no code.
            with torch.serialization.safe_globals([argparse.Namespace]):
                obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "GLOBAL" in str(e):
            raise VitError(
                f"refusing to unpickle {path}: it contains Python objects, not just tensors, and loading them "
                f"could run code ({_first_line(e)}). If you trust its source, re-save only its weights as "
                "a .safetensors file (safetensors.torch.save_file(state_dict, 'weights.safetensors')) and "
                "pass that instead") from e
        raise VitError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}); it may be truncated or "
                       "corrupt: download or copy it again") from e
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, IndexError,
            AttributeError, TypeError) as e:
        raise VitError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: {_first_line(e)}); it "
                       "may be truncated or corrupt: download or copy it again") from e

    hints: dict[str, Any] = {}
    if not isinstance(obj, Mapping):
        raise VitError(f"{path} holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    if isinstance(obj.get("arch"), str):  # timm train.py: the model name it trained
        hints["arch"] = obj["arch"]
    if not _is_state_dict(obj):
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping) and _is_state_dict(obj[k])), None)
        if key is None:
            raise VitError(f"{path} holds no state dict: its entries are {few_keys(map(str, obj))}; expected "
                           f"tensors, or a training checkpoint with one of {', '.join(WRAPPER_KEYS)}")
        ema = [k for k in EMA_KEYS if k != key and isinstance(obj.get(k), Mapping)]
        notes.append(f"weights taken from the '{key}' entry of {path.name}"
                     + (f" (EMA weights also present under '{ema[0]}')" if ema else ""))
        obj = obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return tensors, hints


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and all(isinstance(k, str) for k in obj) and \
        sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise VitError(f"refusing to unpickle {path}: it stores Python objects, not just arrays; vitcli reads "
                           "plain-array .npz files only (numpy.savez of the parameters)") from e
        raise VitError(f"{path} is not a readable .npz ({e}); it may be truncated or corrupt: fetch it again") from e
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as e:
        raise VitError(f"{path} is not a readable .npz ({type(e).__name__}: {e}); it may be truncated or corrupt: "
                       "fetch it again") from e


