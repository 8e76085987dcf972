"""The rules that keep one run from eating another: what to do with the directory a run is given.
(Where a run's files live is vitcli.io.rundir.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from vitcli.errors import VitError
from vitcli.io.paths import make_dirs, writable_dir, write_text
from vitcli.io.rundir import RECIPE_FILE, is_run
from vitcli.io.runlock import entries
from vitcli.recipe import Recipe, load_recipe


def open_run_dir(run_dir: Path, recipe: Recipe, *, resume: bool, force: bool, say=print) -> tuple[Recipe, bool]:
    """Decide what to do with run_dir: return (the recipe to use, whether to resume from its checkpoints).

    - a new or empty directory: the run starts there;
    - a directory holding this very recipe: the run continues (re-running a command resumes it);
    - a directory holding another run: refused unless --resume (continue it with its own recipe)
      or --force (delete it and start again);
    - anything else that is not empty is never overwritten.
    """
    writable_dir(run_dir, "--out")  # a file in the way, no permission, a read-only disk: before any work
    if force and run_dir.exists():
        if entries(run_dir) and not is_run(run_dir):
            raise VitError(f"--out {run_dir} is not empty and is not a vitcli run; --force only replaces runs. Choose another --out.")
        for path in entries(run_dir):  # everything but the lock this process holds
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    if run_dir.is_dir() and entries(run_dir):
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
    return recipe, False  # the directory is created by create_run_dir once data and model are built


def create_run_dir(run_dir: Path, recipe: Recipe) -> None:
    """Create a new run's directory and its recipe.yaml: only after the data and model are known to
    build, so a mistake found on the way leaves nothing behind."""
    make_dirs(run_dir, "--out")
    if not is_run(run_dir):
        write_text(run_dir / RECIPE_FILE, recipe.to_yaml(), "--out")
