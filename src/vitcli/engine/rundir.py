"""Run directories: where a run's files live, and the rules that keep one run from eating another."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import yaml

from vitcli.errors import VitError
from vitcli.recipe import Recipe, load_recipe

RECIPE_FILE = "recipe.yaml"
CHECKPOINTS = "checkpoints"


def default_run_dir(recipe: Recipe, root: Path = Path("runs")) -> Path:
    return root / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def newest_run(root: Path = Path("runs"), prefix: str = "") -> Path | None:
    """The most recently modified run directory under root (optionally named prefix-*)."""
    if not root.is_dir():
        return None
    runs = [p for p in root.iterdir() if p.is_dir() and (p / RECIPE_FILE).exists() and p.name.startswith(prefix)]
    return max(runs, key=lambda p: (p / RECIPE_FILE).stat().st_mtime, default=None)


def is_run(path: Path) -> bool:
    return (path / RECIPE_FILE).is_file()


def open_run_dir(run_dir: Path, recipe: Recipe, *, resume: bool, force: bool, say=print) -> tuple[Recipe, bool]:
    """Decide what to do with run_dir: return (the recipe to use, whether to resume from its checkpoints).

    - a new or empty directory: the run starts there;
    - a directory holding this very recipe: the run continues (re-running a command resumes it);
    - a directory holding another run: refused unless --resume (continue it with its own recipe)
      or --force (delete it and start again);
    - anything else that is not empty is never overwritten.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise VitError(f"--out {run_dir} is a file, not a directory. Choose another --out.")
    if force and run_dir.exists():
        if any(run_dir.iterdir()) and not is_run(run_dir):
            raise VitError(f"--out {run_dir} is not empty and is not a vitcli run; --force only replaces runs. Choose another --out.")
        shutil.rmtree(run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not is_run(run_dir):
            raise VitError(f"--out {run_dir} is not empty and holds no vitcli run. Choose an empty or new directory.")
        saved = load_recipe(run_dir / RECIPE_FILE)
        same = yaml.safe_dump(saved.to_dict()) == yaml.safe_dump(recipe.to_dict())
        if resume or same:
            if not same:
                say(f"Resuming {run_dir} with the recipe saved there (the given recipe differs and is ignored).")
            return saved, True
        raise VitError(
            f"--out {run_dir} already holds a different run. Pass --resume to continue that run, "
            f"--force to delete it and start again, or choose another --out."
        )
    if resume:
        raise VitError(f"--resume: there is no run in {run_dir} to resume. Drop --resume to start a new run.")
    precheck(recipe)
    return recipe, False  # the directory is created by create_run_dir once data and model are built


def create_run_dir(run_dir: Path, recipe: Recipe) -> None:
    """Create a new run's directory and its recipe.yaml: only after the data and model are known to
    build, so a mistake found on the way leaves nothing behind."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not is_run(run_dir):
        recipe.save(run_dir / RECIPE_FILE)


def precheck(recipe: Recipe) -> None:
    """The cheap checks that catch most mistakes before a run directory is created: the model
    resolves with its overrides, the init checkpoint and a local data set path exist, a data set
    name is known. (Everything else is still checked when the run builds its data and model.)"""
    from vitcli.data import lookup
    from vitcli.data.registry import unknown_dataset_error
    from vitcli.engine.setup import model_overrides
    from vitcli.models.registry import resolve_config

    m, d = recipe.model, recipe.data
    if m.init_ckpt is None:
        resolve_config(m.name, **model_overrides(m, m.num_classes or 1))
    elif ":" not in m.init_ckpt and not Path(m.init_ckpt).expanduser().exists():
        raise VitError(f"model.init_ckpt {m.init_ckpt} does not exist. Pass a run directory, a checkpoint file or timm:<name>.")
    if lookup(d.dataset) is None and not Path(d.dataset).expanduser().exists():
        raise unknown_dataset_error(d.dataset)
    if d.data_dir is not None and not Path(d.data_dir).expanduser().exists():
        raise VitError(f"data.data_dir {d.data_dir} does not exist. Point it at a local copy of {d.dataset} (an image folder or a save_to_disk directory).")
