"""What `vit eval` and `vit inspect` work on when told little: which checkpoint, which data set."""

from __future__ import annotations

from pathlib import Path

from vitcli.errors import VitError
from vitcli.io.rundir import newest_run, run_containing, saved_data_dir
from vitcli.models.load import LoadedCheckpoint, load_checkpoint


def resolve_checkpoint(ckpt: str | Path | None, runs_root: Path, say) -> tuple[LoadedCheckpoint, Path | None]:
    """The checkpoint (`ckpt`, else the best of the newest run under runs_root) and the run directory it
    belongs to (None for a loose file)."""
    if ckpt is None:
        run = newest_run(runs_root)
        if run is None:
            raise VitError(f"no --ckpt given and there is no run under {runs_root}/ to take the best checkpoint "
                           "from. Pass --ckpt: a run directory, a .safetensors/.pth/.npz file, a Hugging Face "
                           "model directory, or timm:<model name>")
        say(f"No --ckpt given: evaluating the newest run under {runs_root}/: {run}")
        return load_checkpoint(run), run
    ck = load_checkpoint(ckpt)
    return ck, run_containing(ck.source) if isinstance(ck.source, Path) else None


def resolve_dataset(dataset: str | None, data_dir: str | None, ck: LoadedCheckpoint,
                    run_dir: Path | None) -> tuple[str, str | None]:
    """--dataset, else the checkpoint's own; --data-dir, else the run's (when it is the run's data set)."""
    trained_on = ck.meta.get("dataset")
    if dataset is None:
        if not trained_on:
            raise VitError(f"{ck.source} does not say which data set it was trained on; pass --dataset "
                           "(a name such as cifar100, or a path)")
        dataset = str(trained_on)
    if data_dir is None and run_dir is not None and dataset == trained_on:
        data_dir = saved_data_dir(run_dir)
    return dataset, data_dir
