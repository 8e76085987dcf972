"""Where a training run's wall time goes: `vit pretrain RECIPE` in this process, with timers around the loop's
parts (see benchmarks/profile_step.py, which calls this for a recipe argument).

Timers wrap, for the length of the run: engine.trainer's `start_run` (setup) and `train_step` (the step,
its batches included); the training stream's `__next__` (batches: loader, augmentation, normalisation and
the device copy); `torch.Tensor.backward`; every optimizer's step (torch's global step hooks); and the
run's evaluate, save and log_train. Forward is the step less its batches, backward and optimizer (so it
holds the loss, gradient clipping and the step's own Python too). A timer's own cost is a perf_counter
pair per call: microseconds against steps of milliseconds.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def write_digits_folder(out: Path, count: int = 4000, side: int = 28, seed: int = 0) -> Path:
    """`count` grey PNGs of scikit-learn's digits at side x side (bilinear from 8x8, shifted by up to 2 px),
    in one folder per class: the issue's 28x28 folder."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    for c in range(10):
        (out / str(c)).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        k = int(rng.integers(len(digits.images)))
        image = Image.fromarray((digits.images[k] * 255 / 16).astype(np.uint8)).resize((side - 4, side - 4), Image.BILINEAR)
        canvas = Image.new("L", (side, side))
        canvas.paste(image, tuple(int(v) for v in rng.integers(0, 5, size=2)))
        canvas.save(out / str(digits.target[k]) / f"{i:05d}.png")
    return out


class Timers:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._undo: list = []

    def wrap(self, owner, name: str, label: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] += time.perf_counter() - t0
                self.calls[label] += 1

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def optimizer_hooks(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        started: list[float] = []
        pre = register_optimizer_step_pre_hook(lambda *a: started.append(time.perf_counter()))

        def post(*a) -> None:
            self.seconds["optimizer"] += time.perf_counter() - started.pop()
            self.calls["optimizer"] += 1

        handle = register_optimizer_step_post_hook(post)
        self._undo += [pre.remove, handle.remove]

    def undo(self) -> None:
        for fn in reversed(self._undo):
            fn()


@contextlib.contextmanager
def timed_run():
    from vitcli.engine import trainer
    from vitcli.engine.batches import TrainStream
    from vitcli.engine.run import TrainingRun

    timers = Timers()
    timers.wrap(trainer, "start_run", "setup")
    timers.wrap(trainer, "train_step", "step")
    timers.wrap(TrainStream, "__next__", "batches")
    timers.wrap(torch.Tensor, "backward", "backward")
    timers.wrap(TrainingRun, "evaluate", "evaluation")
    timers.wrap(TrainingRun, "save", "checkpoints")
    timers.wrap(TrainingRun, "log_train", "logging")
    timers.optimizer_hooks()
    try:
        yield timers
    finally:
        timers.undo()


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description="Where a training run's wall time goes (see benchmarks/profile_step.py).")
    ap.add_argument("recipe")
    ap.add_argument("--set", action="append", default=[], help="recipe overrides, as vit pretrain --set")
    ap.add_argument("--digits-folder", help="write the 28x28 digits folder here (if absent) and train on it: vit_pico, patch 4, 28 px")
    ap.add_argument("--out", help="run directory (default: a temporary one)")
    args = ap.parse_args(argv)
    from vitcli.engine.trainer import train
    from vitcli.recipe import load_recipe

    overrides = list(args.set)
    if args.digits_folder:
        folder = Path(args.digits_folder)
        if not folder.exists():
            write_digits_folder(folder)
        overrides = [f"data.dataset={folder}", "model.img_size=28", "model.patch_size=4", "data.mean=[0.5]", "data.std=[0.5]",
                     "model.in_chans=1", *overrides]
    recipe = load_recipe(args.recipe, overrides)
    out = Path(args.out or tempfile.mkdtemp(prefix="profile-loop-")) / "run"
    with timed_run() as timers:
        t0 = time.perf_counter()
        summary = train(recipe, out, force=True)
        wall = time.perf_counter() - t0
    s = timers.seconds
    forward = s["step"] - s["batches"] - s["backward"] - s["optimizer"]
    steps = timers.calls["step"]
    parts = {"setup (data, model, cache decode)": s["setup"], "batches (loader, augmentation, copy)": s["batches"],
             "forward (+ loss, clipping, step Python)": forward, "backward": s["backward"], "optimizer": s["optimizer"],
             "evaluation": s["evaluation"], "checkpoints": s["checkpoints"], "logging": s["logging"]}
    parts["the rest (loop, progress, summary)"] = wall - sum(parts.values())
    images = steps * recipe.train.batch_size
    print(f"{args.recipe} {' '.join(overrides)}: {steps} steps of {recipe.train.batch_size}, wall {wall:.1f} s, "
          f"best top-1 {summary.get('best_top1')}")
    print(f"{'part':42s} {'seconds':>9s} {'share':>7s}")
    for name, value in parts.items():
        print(f"{name:42s} {value:9.2f} {value / wall:7.1%}")
    bare = forward + s["backward"] + s["optimizer"]
    print(f"images/s: step alone (forward, backward, optimizer) {images / bare:,.0f}; with its batches {images / s['step']:,.0f}; "
          f"whole run {images / wall:,.0f} ({images / wall / (images / bare):.0%} of the step alone)")
