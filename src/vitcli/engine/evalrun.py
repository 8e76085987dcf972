"""`vit eval`: score a checkpoint on a data set, with the same `evaluate` that training runs.

    result = run_eval("runs/b16-cifar100", "cifar100", res=384, fewshot=[1, 5, 10, 25])
    print_eval(result)                    # rich table (vitcli.engine.report)
    print(json.dumps(result))             # --json: plain types only, NaN -> null

Steps: find the checkpoint (newest run's best when none is given) -> build its model at the asked
resolution (position embeddings resampled) -> load the evaluation split -> the eval transform the
checkpoint was trained with (normalisation, interpolation, crop_pct from its metadata) -> `evaluate`
-> optional predictions CSV / confusion matrix -> optional few-shot linear evaluation (engine.fewshot).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from vitcli import data as vdata
from vitcli.engine import fewshot as fs
from vitcli.engine.evaluate import evaluate
from vitcli.engine.report import PredictionLog, draw_confusion, print_eval, write_predictions
from vitcli.engine.rundir import RECIPE_FILE, is_run, newest_run
from vitcli.engine.runtime import autocast_dtype, pick_device
from vitcli.errors import VitError
from vitcli.models.load import LoadedCheckpoint, load_checkpoint, model_from_checkpoint
from vitcli.recipe import DataCfg

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")

__all__ = ["eval_cfg", "print_eval", "run_eval"]  # print_eval lives in engine.report


def run_eval(
    ckpt: str | Path | None,
    dataset: str | None,
    *,
    split: str | None = None,
    res: int | None = None,
    batch_size: int = 256,
    data_dir: str | None = None,
    device: str = "auto",
    fewshot: list[int] | None = None,
    predictions: Path | None = None,
    confusion: Path | None = None,
    num_workers: int = 2,
    seed: int = 0,
    runs_root: Path = Path("runs"),
    subset: int | None = None,
    fewshot_seeds: int = 1,
    fewshot_l2: float = fs.DEFAULT_L2,
    progress: Callable[[int, int], None] | None = None,
    say: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Evaluate a checkpoint; return a JSON-ready dict of metrics.

    Args:
        ckpt: anything `load_checkpoint` accepts; None: the best checkpoint of the newest run under
            `runs_root`.
        dataset: registry name or path; None: the data set the checkpoint was trained on.
        split: evaluation split; None: the data set's own test/validation split.
        res: evaluate at this resolution (position embeddings resampled); None: the checkpoint's.
        batch_size: images per forward pass.
        data_dir: a local copy of a named set with the Hub schema.
        device: auto, cpu or cuda (bf16 autocast on CUDA, fp32 on CPU).
        fewshot: K values for the few-shot linear evaluation on frozen pre-logit features.
        predictions / confusion: write a per-image CSV / a confusion-matrix image there.
        num_workers: data loader processes.
        seed: seeds the few-shot choice of training images (seeds seed .. seed+fewshot_seeds-1).
        runs_root: where to look for runs when ckpt is None.
        subset: evaluate on a seeded random choice of this many images only.
        fewshot_seeds: average few-shot accuracy over this many choices of the K images (big_vision: 3).
        fewshot_l2: ridge strength of the few-shot regression.
        progress: called as progress(images_done, images_total) after every batch.
        say: where one-line notes go (which checkpoint was taken, what was adapted).

    Returns:
        top1, top5, loss, ece (fractions; None when the head does not fit the data set and only
        few-shot was asked), num_images, images_per_second, seconds, per_class_accuracy (None for classes
        without images), class_names, checkpoint, model, dataset, split, img_size, device, and, when
        asked, fewshot {str(K): accuracy}, fewshot_l2, fewshot_seeds, predictions, confusion (paths).
    """
    shots = _check_shots(fewshot)
    if fewshot_seeds < 1:
        raise VitError(f"the number of few-shot seeds must be at least 1, got {fewshot_seeds}")
    if batch_size < 1:
        raise VitError(f"--batch-size must be positive, got {batch_size}")
    ck, run_dir = _resolve_checkpoint(ckpt, Path(runs_root), say)
    dataset, data_dir = _resolve_dataset(dataset, data_dir, ck, run_dir)
    dev = pick_device(device)
    amp = autocast_dtype("auto", dev)

    model, ck = model_from_checkpoint(ck, img_size=res)
    for note in ck.notes:
        say(note)
    img_size = _img_size(model)
    eval_set = vdata.load_split(dataset, split, role="eval", data_dir=data_dir, img_size=img_size, seed=0,
                                subset=subset)
    head_fits = model.num_classes == eval_set.num_classes
    if not head_fits:
        what = f"the checkpoint's head has {model.num_classes} classes" if model.num_classes else \
            "the checkpoint has no classification head"
        if not shots:
            raise VitError(
                f"{what} but data set '{eval_set.name}' has {eval_set.num_classes}, so it cannot be scored on "
                f"it directly. Fine-tune it first (`vit finetune --ckpt {ck.source} --dataset {eval_set.name}`), "
                "or measure its frozen features with few-shot linear evaluation (`--fewshot 1,5,10,25`)")
        if predictions or confusion:
            raise VitError(f"{what} but data set '{eval_set.name}' has {eval_set.num_classes}: there are no "
                           "predictions to write; drop --predictions / --confusion (few-shot runs without them)")
        say(f"{what} and '{eval_set.name}' has {eval_set.num_classes}: reporting few-shot accuracy only")
    _warn_class_names(ck.meta.get("class_names"), eval_set, say)

    tf = vdata.build_transform(eval_cfg(ck.meta, _in_chans(model)), img_size, train=False)
    loader = _loader(eval_set, tf, batch_size, num_workers, seed, dev)
    model.to(dev)
    log = PredictionLog() if (predictions or confusion) else None
    capture = FeatureCapture(model) if shots else None
    on_batch = _callbacks(log, capture, progress, len(eval_set))
    try:
        if head_fits:
            metrics = evaluate(model, loader, eval_set.num_classes, dev, amp, on_batch=on_batch)
        else:
            metrics = _features_only(model, loader, dev, amp, on_batch)
    finally:
        if capture is not None:
            capture.close()

    result: dict[str, Any] = {
        "checkpoint": str(ck.source),
        "model": ck.meta.get("model"),
        "dataset": eval_set.name,
        "split": eval_set.split,
        "img_size": list(img_size),
        "device": str(dev),
        **metrics,
        "per_class_accuracy": [None if a is None or a != a else float(a) for a in metrics["per_class_accuracy"]],
        "class_names": list(eval_set.class_names),
    }
    if predictions:
        result["predictions"] = str(write_predictions(predictions, log, eval_set.class_names))
    if confusion:
        title = f"{Path(str(ck.source)).name} on {eval_set.name} [{eval_set.split}], top-1 {100 * result['top1']:.1f}%"
        result["confusion"] = str(draw_confusion(confusion, log.labels, log.predictions, eval_set.num_classes,
                                                 eval_set.class_names, title))
    if shots:
        eval_feats, eval_labels = capture.arrays()
        result["fewshot"] = _fewshot(model, tf, dataset, data_dir, eval_set, eval_feats, eval_labels, shots,
                                     list(range(seed, seed + fewshot_seeds)), fewshot_l2, batch_size, num_workers,
                                     dev, amp, say)
        result["fewshot_l2"] = fewshot_l2
        result["fewshot_seeds"] = fewshot_seeds
    return result


# ---------------------------------------------------------------------------------------------------
# What to evaluate


def _check_shots(fewshot: Iterable[int] | None) -> list[int]:
    shots = sorted({int(k) for k in fewshot or []})
    if any(k < 1 for k in shots):
        raise VitError(f"--fewshot takes positive numbers of images per class (e.g. 1,5,10,25), got {shots}")
    return shots


def _resolve_checkpoint(ckpt: str | Path | None, runs_root: Path, say) -> tuple[LoadedCheckpoint, Path | None]:
    """The checkpoint to evaluate and the run directory it belongs to (None for a loose file)."""
    if ckpt is None:
        run = newest_run(runs_root)
        if run is None:
            raise VitError(f"no --ckpt given and there is no run under {runs_root}/ to take the best checkpoint "
                           "from. Pass --ckpt: a run directory, a .safetensors/.pth/.npz file, a Hugging Face "
                           "model directory, or timm:<model name>")
        say(f"No --ckpt given: evaluating the newest run under {runs_root}/: {run}")
        return load_checkpoint(run), run
    ck = load_checkpoint(ckpt)
    if isinstance(ck.source, Path):
        for folder in [ck.source, *ck.source.parents][:5]:
            if is_run(folder):
                return ck, folder
    return ck, None


def _resolve_dataset(dataset: str | None, data_dir: str | None, ck: LoadedCheckpoint,
                     run_dir: Path | None) -> tuple[str, str | None]:
    """--dataset, else the checkpoint's own; --data-dir, else the run's (when it is the run's data set)."""
    trained_on = ck.meta.get("dataset")
    if dataset is None:
        if not trained_on:
            raise VitError(f"{ck.source} does not say which data set it was trained on; pass --dataset "
                           "(a name such as cifar100, or a path)")
        dataset = str(trained_on)
    if data_dir is None and run_dir is not None and dataset == trained_on:
        try:
            saved = yaml.safe_load((run_dir / RECIPE_FILE).read_text()) or {}
            data_dir = (saved.get("data") or {}).get("data_dir") or None
        except (OSError, yaml.YAMLError, AttributeError):
            data_dir = None
    return dataset, data_dir


def eval_cfg(meta: dict[str, Any], in_chans: int = 3) -> DataCfg:
    """The eval-transform settings a checkpoint was trained with (defaults: mean = std = 0.5, bicubic,
    crop_pct 0.875)."""
    mean = meta.get("mean") or [0.5] * in_chans
    std = meta.get("std") or [0.5] * in_chans
    interpolation = meta.get("interpolation")
    crop_pct = meta.get("crop_pct")
    return DataCfg(
        mean=[float(m) for m in mean],
        std=[float(s) for s in std],
        interpolation=interpolation if interpolation in INTERPOLATIONS else "bicubic",
        crop_pct=float(crop_pct) if crop_pct else 0.875,
    )


def _img_size(model: torch.nn.Module) -> tuple[int, int]:
    cfg = getattr(model, "config", None)
    size = getattr(cfg, "img_size", None) or model.patch_embed.img_size
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _in_chans(model: torch.nn.Module) -> int:
    return int(getattr(getattr(model, "config", None), "in_chans", 3))


def _warn_class_names(trained: list[str] | None, eval_set, say) -> None:
    names = list(eval_set.class_names)
    if trained and len(trained) == len(names) and list(trained) != names and \
            names != [str(i) for i in range(len(names))]:
        say(f"warning: the checkpoint's class names differ from those of '{eval_set.name}' "
            f"(e.g. {trained[0]!r} vs {names[0]!r}); scores assume class i of the checkpoint is class i of the data")


def _loader(image_set, tf, batch_size: int, num_workers: int, seed: int, dev: torch.device):
    return vdata.make_loader(image_set, tf, batch_size, shuffle=False, drop_last=False, num_workers=num_workers,
                             seed=seed, pin_memory=dev.type == "cuda", device=dev)


# ---------------------------------------------------------------------------------------------------
# Features


class FeatureCapture:
    """Keeps the pre-logit features (the head's input) and labels of every batch the model sees.

    A forward pre-hook on the classification head: the features come from the same forward pass that
    `evaluate` scores, so few-shot evaluation costs no second pass over the evaluation split.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        head = model.get_classifier() if hasattr(model, "get_classifier") else model.head
        self._feats: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        self._handle = head.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self._feats.append(args[0].detach().float().cpu())

    def add_labels(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self._labels.append(labels.cpu())

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._feats:
            return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
        return torch.cat(self._feats).numpy(), torch.cat(self._labels).numpy()

    def close(self) -> None:
        self._handle.remove()


def _callbacks(log, capture, progress, total: int):
    calls = [c for c in (log, capture.add_labels if capture else None) if c is not None]
    seen = [0]

    def on_batch(logits: torch.Tensor, labels: torch.Tensor) -> None:
        for call in calls:
            call(logits, labels)
        if progress is not None:
            seen[0] += len(labels)
            progress(seen[0], total)

    return on_batch if (calls or progress) else None


@torch.no_grad()
def _features_only(model, batches, device: torch.device, amp, on_batch) -> dict[str, Any]:
    """Run the model over batches for the hooks only (its head does not fit the data set's classes)."""
    import time
    from contextlib import nullcontext

    model.eval()
    ctx = torch.autocast(device.type, dtype=amp) if amp else nullcontext()
    n, start = 0, time.perf_counter()
    for images, labels in batches:
        with ctx:
            logits = model(images.to(device, non_blocking=True))
        if on_batch is not None:
            on_batch(logits, labels)
        n += len(labels)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return {"top1": None, "top5": None, "loss": None, "ece": None, "num_images": n, "per_class_accuracy": [],
            "seconds": seconds, "images_per_second": n / seconds if seconds > 0 else 0.0}


def _fewshot(model, tf, dataset: str, data_dir: str | None, eval_set, eval_feats: np.ndarray,
             eval_labels: np.ndarray, shots: list[int], seeds: list[int], l2: float, batch_size: int,
             num_workers: int, dev: torch.device, amp, say) -> dict[str, float]:
    """Few-shot linear accuracy on the evaluation features for each K (see engine.fewshot)."""
    train = vdata.load_split(dataset, None, role="train", data_dir=data_dir, img_size=_img_size(model), seed=0)
    if train.split == eval_set.split.split("[")[0]:
        say(f"warning: the few-shot training images come from split '{train.split}', the split being evaluated")
    if train.num_classes != eval_set.num_classes:
        raise VitError(f"the training split of '{train.name}' has {train.num_classes} classes but the evaluation "
                       f"split has {eval_set.num_classes}; few-shot evaluation needs the same classes")
    labels = np.asarray(train.dataset.select_columns(["label"]).with_format("numpy")["label"], dtype=np.int64)
    need = fs.needed_images(labels, train.num_classes, shots, seeds)
    short = [train.class_names[c] for c in range(train.num_classes) if np.sum(labels == c) < max(shots)]
    if short:
        say(f"few-shot: {len(short)} class(es) have fewer than {max(shots)} training images "
            f"(e.g. {short[0]!r}); they use all they have")
    subset = vdata.ImageSet(train.dataset.select(need, keep_in_memory=True), train.num_classes, train.class_names,
                            train.name, f"{train.split}[few-shot]")
    capture = FeatureCapture(model)
    try:
        _features_only(model, _loader(subset, tf, batch_size, num_workers, seeds[0], dev), dev, amp,
                       capture.add_labels)
    finally:
        capture.close()
    feats, _ = capture.arrays()
    return fs.fewshot_results(feats, need, labels, eval_feats, eval_labels, train.num_classes, shots, seeds, l2)
