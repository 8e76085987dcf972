"""vitcli against timm's own train.py on a folder of 28x28 grey digit PNGs: whole processes timed in turn, the
same model, optimizer, schedule, augmentation and epochs; wall time and best top-1 of each run.

    .venv/bin/python benchmarks/timm_side_by_side.py --timm-train /path/to/pytorch-image-models/train.py
    .venv/bin/python benchmarks/timm_side_by_side.py --timm-train T --seeds 0,1,2 --epochs 30 --timm-workers 2

timm's train.py is not part of the timm package: pass the file from a checkout of pytorch-image-models at or
near the installed timm's version. The folder (benchmarks/loop_timers.write_digits_folder: 3,600 train + 400
val images in train/ and val/, one sub-folder per class) is written under --out when absent.

Shared settings: a ViT of vit_pico's shape at 28 px (patch 4, width 64, depth 4, 4 heads, MLP 256, class
token, one grey channel normalised by 0.5 / 0.5), AdamW lr 2e-3, weight decay 0.05, batch 64, cosine decay
per step after one epoch of linear warmup (56 steps), gradients clipped to norm 1 (vitcli's default, the
paper's), drop path 0.1, label smoothing 0.3, RandomResizedCrop
scale 0.9-1, ratio 0.8-1.25, bilinear, no flip, centre crop 1.0 for evaluation, an evaluation every epoch.
Each tool runs as it runs best on this machine: vitcli with data.cache decoded and no loader processes,
timm with --timm-workers processes (its transforms are per image in PIL). Runs alternate (vitcli, timm, vitcli,
...) so load drift hits both.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from loop_timers import write_digits_folder  # noqa: E402

RECIPE = """name: side_by_side
model: {name: vit_pico, img_size: 28, patch_size: 4, in_chans: 1, drop_path_rate: 0.1}
data:
  dataset: FOLDER
  num_workers: 0
  cache: decoded
  crop_scale: [0.9, 1.0]
  crop_ratio: [0.8, 1.25]
  hflip: 0.0
  crop_pct: 1.0
  interpolation: bilinear
  mean: [0.5]
  std: [0.5]
  label_smoothing: 0.3
optim: {name: adamw, lr: 2.0e-3, weight_decay: 0.05}
schedule: {warmup_steps: 56, decay: cosine}
train: {epochs: EPOCHS, batch_size: 64, log_every: 50, seed: SEED}
"""


def timm_command(train_py: str, folder: Path, out: Path, epochs: int, seed: int, workers: int) -> list[str]:
    return [sys.executable, train_py, "--data-dir", str(folder), "--train-split", "train", "--val-split", "val",
            "--model", "vit_tiny_patch16_224", "--model-kwargs", "patch_size=4", "embed_dim=64", "depth=4", "num_heads=4",
            "mlp_ratio=4", "img_size=28", "--img-size", "28", "--in-chans", "1", "--num-classes", "10", "--mean", "0.5", "--std", "0.5",
            "--crop-pct", "1.0", "--interpolation", "bilinear", "--scale", "0.9", "1.0", "--ratio", "0.8", "1.25", "--hflip", "0",
            "--opt", "adamw", "--lr", "2e-3", "--weight-decay", "0.05", "--sched", "cosine", "--sched-on-updates",
            "--warmup-epochs", "1", "--warmup-lr", "0", "--min-lr", "0", "--epochs", str(epochs), "--cooldown-epochs", "0",
            "--batch-size", "64", "--validation-batch-size", "64", "--drop-path", "0.1", "--smoothing", "0.3", "--clip-grad", "1.0", "--clip-mode", "norm",
            "--workers", str(workers), "--device", "cpu", "--no-prefetcher", "--seed", str(seed), "--log-interval", "50",
            "--checkpoint-hist", "1", "--output", str(out), "--experiment", "run"]


def timm_best(out: Path) -> float:
    with open(out / "run" / "summary.csv") as f:
        return max(float(row["eval_top1"]) for row in csv.DictReader(f)) / 100


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timm-train", required=True, help="timm's train.py (from a pytorch-image-models checkout)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "side_by_side"))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--timm-workers", type=int, default=2)
    args = ap.parse_args()
    out = Path(args.out)
    folder = out / "digits28"
    if not (folder / "val").exists():
        write_digits_folder(folder / "train", count=3600, seed=0)
        write_digits_folder(folder / "val", count=400, seed=1)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for tool in ("vitcli", "timm"):
            run = out / f"{tool}-seed{seed}"
            shutil.rmtree(run, ignore_errors=True)
            run.mkdir(parents=True)
            if tool == "vitcli":
                recipe = run / "recipe.yaml"
                recipe.write_text(RECIPE.replace("FOLDER", str(folder)).replace("EPOCHS", str(args.epochs)).replace("SEED", str(seed)))
                cmd = [str(ROOT / ".venv" / "bin" / "vit"), "pretrain", str(recipe), "--out", str(run / "run"), "--force"]
            else:
                cmd = timm_command(args.timm_train, folder, run, args.epochs, seed, args.timm_workers)
            t0 = time.perf_counter()
            done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            wall = time.perf_counter() - t0
            if done.returncode:
                sys.exit(f"{tool} failed:\n{done.stderr[-3000:]}")
            best = (json.loads((run / "run" / "summary.json").read_text())["best_top1"] if tool == "vitcli" else timm_best(run))
            results.append({"tool": tool, "seed": seed, "wall_seconds": round(wall, 1), "best_top1": round(best, 4)})
            print(json.dumps(results[-1]), flush=True)
    walls = {t: [r["wall_seconds"] for r in results if r["tool"] == t] for t in ("vitcli", "timm")}
    tops = {t: [r["best_top1"] for r in results if r["tool"] == t] for t in ("vitcli", "timm")}
    ratios = [b / a for a, b in zip(walls["vitcli"], walls["timm"])]
    print(f"wall: vitcli {walls['vitcli']} s, timm {walls['timm']} s; timm / vitcli per seed {[round(r, 2) for r in ratios]}, "
          f"median {statistics.median(ratios):.2f}x")
    print(f"best top-1: vitcli {tops['vitcli']} (median {statistics.median(tops['vitcli']):.4f}), "
          f"timm {tops['timm']} (median {statistics.median(tops['timm']):.4f})")


if __name__ == "__main__":
    main()
