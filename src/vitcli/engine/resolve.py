"""What `vit eval`, `predict`, `inspect` and `export` work on: which checkpoint (when told little), its
model ready for inference, and which data set."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from vitcli.errors import VitError
from vitcli.io.rundir import newest_run, run_containing, saved_data_dir
from vitcli.models.adapt import model_from_checkpoint
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


def load_for_inference(ckpt: str | Path | None, runs_root: Path, say: Callable[[str], Any],
                       img_size: tuple[int, int] | None = None, needs_head: str | None = None,
                       ) -> tuple[nn.Module, LoadedCheckpoint, Path | None]:
    """The start every read-only command shares: resolve the checkpoint, build its model (at `img_size`
    when given), say what was adapted, eval mode. `needs_head` names the command when it cannot work on
    an encoder without a classification head."""
    ck, run_dir = resolve_checkpoint(ckpt, runs_root, say)
    model, ck = model_from_checkpoint(ck, img_size=img_size)
    if needs_head and not model.num_classes:
        raise VitError(f"{ck.source} has no classification head (a self-supervised encoder?), so {needs_head}. "
                       "Fine-tune it first: vit finetune --ckpt ... --dataset ...")
    for note in ck.notes:
        say(note)
    return model.eval(), ck, run_dir


def resolve_dataset(dataset: str | None, data_dir: str | None, ck: LoadedCheckpoint,
                    run_dir: Path | None) -> tuple[str, str | None]:
    """--dataset, else the checkpoint's own; --data-dir, else the run's (when it is the run's data set)."""
    trained_on = ck.meta.dataset
    if dataset is None:
        if not trained_on:
            raise VitError(f"{ck.source} does not say which data set it was trained on; pass --dataset "
                           "(a name such as cifar100, or a path)")
        dataset = str(trained_on)
    if data_dir is None and run_dir is not None and dataset == trained_on:
        data_dir = saved_data_dir(run_dir)
    return dataset, data_dir
