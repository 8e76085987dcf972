"""Where a run's files live. The layout, and the lookups every command shares:

    RUN/recipe.yaml                     the fully resolved recipe (a run directory is a folder with one)
    RUN/metrics.jsonl, RUN/summary.json
    RUN/checkpoints/step-00000450/      model.safetensors (+ state.pt; sharded/ under FSDP)
    RUN/checkpoints/best -> step-...    symlinks to the best and the newest step
    RUN/checkpoints/last -> step-...
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

RECIPE_FILE = "recipe.yaml"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINTS = "checkpoints"
WEIGHTS = "model.safetensors"
STATE = "state.pt"
SHARDED = "sharded"  # the DCP folder inside an FSDP checkpoint's step directory
LINKS = ("best", "last")
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class StepDir:
    path: Path  # a checkpoints/step-N directory
    step: int


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def default_run_dir(name: str, root: Path = Path("runs")) -> Path:
    return root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def is_run(path: Path) -> bool:
    return (Path(path) / RECIPE_FILE).is_file()


def newest_run(root: Path = Path("runs"), prefix: str = "") -> Path | None:
    """The most recently started run directory under root (optionally named prefix-*)."""
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if p.is_dir() and (p / RECIPE_FILE).exists() and p.name.startswith(prefix)]
    return max(runs, key=lambda p: (p / RECIPE_FILE).stat().st_mtime, default=None)


def run_containing(path: Path, depth: int = 5) -> Path | None:
    """The run directory a checkpoint file or folder belongs to (itself or one of its parents), if any."""
    path = Path(path)
    return next((folder for folder in [path, *path.parents][:depth] if is_run(folder)), None)


def saved_data_dir(run_dir: Path) -> str | None:
    """The data.data_dir a run was trained with (None when unset or unreadable)."""
    return saved_data_setting(run_dir, "data_dir")


def saved_data_setting(run_dir: Path, key: str) -> str | None:
    """A data.* setting a run was trained with (None when unset or unreadable)."""
    try:
        saved = yaml.safe_load((Path(run_dir) / RECIPE_FILE).read_text()) or {}
        return (saved.get("data") or {}).get(key) or None
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def step_dirs(root: Path) -> list[StepDir]:
    """The step-N directories of a checkpoints/ folder (links and temporary folders left out), any order."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and not p.is_symlink():
            found.append(StepDir(p, int(m.group(1))))
    return found


def is_sharded(step_dir: Path) -> bool:
    return (Path(step_dir) / SHARDED / ".metadata").is_file()


def has_weights(step_dir: Path) -> bool:
    return (Path(step_dir) / WEIGHTS).is_file()


def linked_checkpoint(path: Path, usable: Callable[[Path], bool]) -> tuple[str, Path] | None:
    """(which link, step directory) of the best, else last, checkpoint of a run directory or its
    checkpoints/ folder for which usable(step_dir) holds; None when neither is."""
    path = Path(path)
    for base in (path / CHECKPOINTS, path):
        for which in LINKS:
            if usable(base / which):
                return which, base / which
    return None
