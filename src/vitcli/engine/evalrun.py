"""`vit eval`: score a checkpoint on a data set, with the same `evaluate` that training runs.

    result = run_eval(EvalSpec("runs/b16-cifar100", "cifar100", res=(384, 384), fewshot=FewshotSpec((1, 5, 10, 25))))
    print_eval(result)                    # rich table (vitcli.engine.report)
    print(json.dumps(result))             # --json: plain types only, NaN -> null

Steps: find the checkpoint (newest run's best when none is given) -> build its model at the asked
resolution (position embeddings resampled) -> load the evaluation split -> the eval transform the
checkpoint was trained with (normalisation, interpolation, crop_pct from its metadata) -> `evaluate`
-> optional predictions CSV / confusion matrix -> optional frozen-feature evaluations: few-shot linear
(objectives.fewshot), weighted k-NN (objectives.knn), a linear probe (objectives.linear_probe).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitcli import data as vdata
from vitcli.objectives import fewshot as fs
from vitcli.engine.evalspec import EvalSpec, FewshotSpec
from vitcli.engine.report import PredictionLog, draw_confusion, figure_path, print_eval, write_predictions
from vitcli.engine.resolve import load_for_inference, resolve_dataset
from vitcli.engine.det_eval import detection_eval
from vitcli.engine.seg_eval import segmentation_eval
from vitcli.engine.runtime import autocast_dtype, pick_device
from vitcli.errors import VitError
from vitcli.io.paths import writable_file
from vitcli.models import input_channels, input_size
from vitcli.io.rundir import saved_data_setting
from vitcli.objectives import evaluate
from vitcli.objectives import linear_probe as probe
from vitcli.objectives.knn import knn_accuracy
from vitcli.objectives.multilabel import evaluate_multilabel

DENSE_EVALS = {"segmentation": segmentation_eval, "detection": detection_eval}  # a task head's own evaluation

__all__ = ["EvalSpec", "FewshotSpec", "print_eval", "run_eval"]  # print_eval lives in engine.report


def run_eval(spec: EvalSpec, *, progress: Callable[[int, int], None] | None = None,
             say: Callable[[str], Any] = print) -> dict[str, Any]:
    """Evaluate a checkpoint as `spec` says; return a JSON-ready dict of metrics.

    progress(images_done, images_total) is called after every batch; `say` takes one-line notes (which
    checkpoint was taken, what was adapted).

    Returns:
        top1, top5, loss, ece (fractions; None when the head does not fit the data set and only
        few-shot was asked), num_images, images_per_second, seconds, per_class_accuracy (None for classes
        without images), class_names, checkpoint, model, dataset, split, img_size, device, skipped_images,
        and, when asked, fewshot {str(K): accuracy}, fewshot_l2, fewshot_seeds, knn {str(k): accuracy},
        linear_probe {accuracy, lr, protocol, heldout_accuracy},
        predictions, confusion (paths).
    """
    shots = list(spec.fewshot.shots)
    predictions = writable_file(spec.predictions, "--predictions") if spec.predictions else None  # before any work
    confusion = figure_path(spec.confusion, "--confusion") if spec.confusion else None
    model, ck, run_dir = load_for_inference(spec.ckpt, Path(spec.runs_root), say, img_size=spec.res)
    dataset, data_dir = resolve_dataset(spec.dataset, spec.data_dir, ck, run_dir)
    dev = pick_device(spec.device)
    amp = autocast_dtype("auto", dev)
    img_size = input_size(model)
    if ck.meta.task == "multilabel":
        return _multilabel(spec, model, ck, run_dir, dataset, data_dir, dev, amp, say, progress)
    if ck.meta.task in DENSE_EVALS:
        return DENSE_EVALS[ck.meta.task](spec, model, ck, dataset, data_dir, dev, amp, say, progress)
    eval_set = vdata.load_split(dataset, spec.split, role="eval", data_dir=data_dir, img_size=img_size, seed=0,
                                subset=spec.subset, carve=False, say=say)  # a folder of class folders: every image
    frozen_only = bool(shots or spec.knn or spec.linear_probe)  # evaluations of frozen features: no fitting head needed
    head_fits = _head_fits(model, eval_set, ck, frozen_only, bool(predictions or confusion), say)
    _warn_class_names(ck.meta.class_names, eval_set, say)

    transform = vdata.TransformSpec.from_checkpoint(ck.meta, input_channels(model), reduced_decode=spec.reduced_decode)
    tf = vdata.build_transform(transform, img_size, train=False)
    loader = _loader(eval_set, tf, spec.loader, dev)
    model.to(dev)
    log = PredictionLog() if (predictions or confusion) else None
    capture = FeatureCapture(model) if frozen_only else None
    on_batch = _callbacks(log, capture, progress, len(eval_set))
    try:
        metrics = evaluate(model, loader, eval_set.num_classes if head_fits else None, dev, amp, on_batch=on_batch)
    finally:
        if capture is not None:
            capture.close()

    result: dict[str, Any] = {
        "checkpoint": str(ck.source),
        "model": ck.meta.model,
        "dataset": eval_set.name,
        "split": eval_set.split,
        "img_size": list(img_size),
        "device": str(dev),
        **metrics,
        "per_class_accuracy": [None if a is None or a != a else float(a) for a in metrics["per_class_accuracy"]],
        "class_names": list(eval_set.class_names),
        "skipped_images": loader.skipped,
    }
    if loader.skipped:
        say(f"skipped {loader.skipped} unreadable image(s) (--bad-images skip), e.g. {loader.skipped_examples[0]}")
    if predictions:
        result["predictions"] = str(write_predictions(predictions, log, eval_set.class_names))
    if confusion:
        title = f"{Path(str(ck.source)).name} on {eval_set.name} [{eval_set.split}], top-1 {100 * result['top1']:.1f}%"
        result["confusion"] = str(draw_confusion(confusion, log.labels, log.predictions, eval_set.num_classes,
                                                 eval_set.class_names, title))
    if capture is not None:
        eval_feats, eval_labels = capture.arrays()
        frozen = _FrozenFeatures(model, tf, dataset, data_dir, spec, dev, amp)
        if shots:
            result["fewshot"] = frozen.fewshot(eval_set, eval_feats, eval_labels, say)
            result["fewshot_l2"] = spec.fewshot.l2
            result["fewshot_seeds"] = spec.fewshot.seeds
        if spec.knn:
            result["knn"] = frozen.knn(eval_set, eval_feats, eval_labels, say)
        if spec.linear_probe:
            protocol = spec.linear_probe if spec.linear_probe != "auto" else ("mae" if ck.meta.objective == "mae" else "dino")
            result["linear_probe"] = frozen.linear_probe(eval_set, protocol, say)
    return result


def _multilabel(spec: EvalSpec, model, ck, run_dir, dataset: str, data_dir, dev, amp, say, progress) -> dict[str, Any]:
    """A multi-label checkpoint: mAP, per-class AP, F1 at the checkpoint's threshold (objectives.multilabel)."""
    if spec.fewshot.shots or spec.knn or spec.linear_probe or spec.predictions or spec.confusion:
        raise VitError("--fewshot, --knn, --linear-probe, --predictions and --confusion score one class per image; this checkpoint is "
                       "multi-label. Drop them (vit predict lists each image's labels over the threshold).")
    labels = spec.labels or (saved_data_setting(run_dir, "labels") if run_dir is not None and spec.dataset is None else None)
    eval_set = vdata.load_split(dataset, spec.split, role="eval", data_dir=data_dir, img_size=input_size(model), seed=0,
                                subset=spec.subset, carve=False, say=say, label_file=labels)
    if not eval_set.multilabel or eval_set.num_classes != model.num_classes:
        raise VitError(f"the checkpoint is multi-label over {model.num_classes} classes; {eval_set.name} "
                       f"{'has ' + str(eval_set.num_classes) + ' classes' if eval_set.multilabel else 'has one class per image'}. "
                       "Pass its labels file with --labels FILE.csv|json (or a set with a Sequence(ClassLabel) column).")
    transform = vdata.TransformSpec.from_checkpoint(ck.meta, input_channels(model), reduced_decode=spec.reduced_decode)
    loader = _loader(eval_set, vdata.build_transform(transform, input_size(model), train=False), spec.loader, dev)
    model.to(dev)
    seen = [0]

    def on_batch(logits, targets) -> None:
        seen[0] += len(targets)
        if progress is not None:
            progress(seen[0], len(eval_set))

    metrics = evaluate_multilabel(model, loader, dev, amp, threshold=ck.meta.training.get("threshold"), on_batch=on_batch)
    return {"checkpoint": str(ck.source), "model": ck.meta.model, "dataset": eval_set.name, "split": eval_set.split,
            "img_size": list(input_size(model)), "device": str(dev), "task": "multilabel", "top1": None, **metrics,
            "class_names": list(eval_set.class_names), "skipped_images": loader.skipped}


# ---------------------------------------------------------------------------------------------------
# What to evaluate


def _head_fits(model: torch.nn.Module, eval_set, ck, frozen_only: bool, writes: bool, say) -> bool:
    """Whether the model's head scores this data set's classes; if not, only frozen-feature evaluations
    (few-shot, k-NN) can be asked for."""
    if model.num_classes == eval_set.num_classes:
        return True
    what = f"the checkpoint's head has {model.num_classes} classes" if model.num_classes else \
        "the checkpoint has no classification head"
    if not frozen_only:
        raise VitError(
            f"{what} but data set '{eval_set.name}' has {eval_set.num_classes}, so it cannot be scored on "
            f"it directly. Fine-tune it first (`vit finetune --ckpt {ck.source} --dataset {eval_set.name}`), "
            "or measure its frozen features: few-shot linear evaluation (`--fewshot 1,5,10,25`) or k-NN (`--knn 20`)")
    if writes:
        raise VitError(f"{what} but data set '{eval_set.name}' has {eval_set.num_classes}: there are no "
                       "predictions to write; drop --predictions / --confusion (few-shot and k-NN run without them)")
    say(f"{what} and '{eval_set.name}' has {eval_set.num_classes}: reporting frozen-feature accuracy only")
    return False


def _warn_class_names(trained: list[str] | None, eval_set, say) -> None:
    names = list(eval_set.class_names)
    if trained and len(trained) == len(names) and list(trained) != names and \
            names != [str(i) for i in range(len(names))]:
        say(f"warning: the checkpoint's class names differ from those of '{eval_set.name}' "
            f"(e.g. {trained[0]!r} vs {names[0]!r}); scores assume class i of the checkpoint is class i of the data")


def _loader(image_set, tf, spec: vdata.LoaderSpec, dev: torch.device):
    return vdata.make_loader(image_set, tf, replace(spec, pin_memory=dev.type == "cuda"), device=dev)


# ---------------------------------------------------------------------------------------------------
# Features


class FeatureCapture:
    """Keeps the pre-logit features (the head's input) and labels of every batch the model sees.

    A forward pre-hook on the classification head: the features come from the same forward pass that
    `evaluate` scores, so few-shot evaluation costs no second pass over the evaluation split.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        head = model.get_classifier() if hasattr(model, "get_classifier") else model.head
        # a distilled model's pre-logits are its two heads' inputs averaged (DeiT, timm's pre_logits)
        heads = [head] + ([model.head_dist] if getattr(model, "dist_token", None) is not None else [])
        self._per_head: list[list[torch.Tensor]] = [[] for _ in heads]
        self._labels: list[torch.Tensor] = []
        self._handles = [h.register_forward_pre_hook(self._hook(i)) for i, h in enumerate(heads)]

    def _hook(self, index: int):
        def hook(module, args) -> None:
            self._per_head[index].append(args[0].detach().float().cpu())
        return hook

    def add_labels(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self._labels.append(labels.cpu())

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if not self._per_head[0]:
            return np.zeros((0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
        feats = torch.stack([torch.cat(f) for f in self._per_head]).mean(dim=0)
        return feats.numpy(), torch.cat(self._labels).numpy()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()


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


@dataclass
class _FrozenFeatures:
    """The frozen model's features (eval transform) of training-split images, for the evaluations fitted on
    them: few-shot linear (K images per class, objectives.fewshot), weighted k-NN (the whole split,
    objectives.knn) and the linear probe (objectives.linear_probe). The training split is read once for all."""

    model: torch.nn.Module
    tf: Callable
    dataset: str
    data_dir: str | None
    spec: EvalSpec
    dev: torch.device
    amp: Any
    _train: Any = None

    def train_split(self, eval_set, say):
        if self._train is None:
            train = vdata.load_split(self.dataset, None, role="train", data_dir=self.data_dir,
                                     img_size=input_size(self.model), seed=0)
            if train.split.split("[")[0] == eval_set.split.split("[")[0]:
                say(f"warning: the frozen-feature training images come from split '{train.split}', the split being evaluated")
            if train.num_classes != eval_set.num_classes:
                raise VitError(f"the training split of '{train.name}' has {train.num_classes} classes but the evaluation "
                               f"split has {eval_set.num_classes}; few-shot and k-NN evaluation need the same classes")
            self._train = train
        return self._train

    def of(self, images) -> tuple[np.ndarray, np.ndarray]:
        """(features, labels) of every image of `images` (an ImageSet), in order."""
        capture = FeatureCapture(self.model)
        try:
            loader = _loader(images, self.tf, replace(self.spec.loader, seed=self.spec.fewshot.seed), self.dev)
            evaluate(self.model, loader, None, self.dev, self.amp, on_batch=capture.add_labels)
        finally:
            capture.close()
        return capture.arrays()

    def fewshot(self, eval_set, eval_feats: np.ndarray, eval_labels: np.ndarray, say) -> dict[str, float]:
        """Few-shot linear accuracy on the evaluation features for each K: the model's features of the K
        training images per class chosen for each seed."""
        few = self.spec.fewshot
        shots, seeds = list(few.shots), few.seed_list
        train = self.train_split(eval_set, say)
        labels = vdata.label_array(train.dataset)
        need = fs.needed_images(labels, train.num_classes, shots, seeds)
        short = [train.class_names[c] for c in range(train.num_classes) if np.sum(labels == c) < max(shots)]
        if short:
            say(f"few-shot: {len(short)} class(es) have fewer than {max(shots)} training images "
                f"(e.g. {short[0]!r}); they use all they have")
        subset = vdata.ImageSet(train.dataset.select(need, keep_in_memory=True), train.num_classes, train.class_names,
                                train.name, f"{train.split}[few-shot]")
        feats, _ = self.of(subset)
        return fs.fewshot_results(feats, need, labels, eval_feats, eval_labels, train.num_classes, shots, seeds, few.l2)

    def linear_probe(self, eval_set, protocol: str, say) -> dict[str, Any]:
        """A linear probe of the protocol's features, its learning rate chosen on held-out training images."""
        train = self.train_split(eval_set, say)
        say(f"linear probe ({protocol}): embedding {len(train)} training and {len(eval_set)} test images, then "
            f"{len(probe.LEARNING_RATES)} heads at once")
        batches = [_loader(part, self.tf, replace(self.spec.loader, seed=self.spec.fewshot.seed), self.dev)
                   for part in (train, eval_set)]
        (train_x, train_y), (test_x, test_y) = (probe.collect(self.model, b, protocol, self.dev, self.amp) for b in batches)
        return probe.linear_probe(train_x.to(self.dev), train_y.to(self.dev), test_x.to(self.dev), test_y.to(self.dev),
                                  train.num_classes, protocol, seed=self.spec.fewshot.seed)

    def knn(self, eval_set, eval_feats: np.ndarray, eval_labels: np.ndarray, say) -> dict[str, float]:
        """Weighted k-NN accuracy for each k of the spec, the whole training split as neighbours."""
        train = self.train_split(eval_set, say)
        say(f"k-NN: embedding the {len(train)} images of {train.name} [{train.split}]")
        feats, labels = self.of(train)
        return knn_accuracy(feats, labels, eval_feats, eval_labels, train.num_classes, self.spec.knn)
