"""Multi-label classification on digits: each image two scikit-learn digits side by side, labelled with both.

    .venv/bin/python benchmarks/multilabel_digits.py                   # seeds 0-2
    .venv/bin/python benchmarks/multilabel_digits.py --seeds 0 --images 600

Writes a folder of --images 8x16 PNGs (digits drawn at random, seed 0; an image of two equal digits has one
label) and its labels.csv, then for each seed `vit pretrain recipes/quickstart.yaml --set data.dataset=DIR
--set data.labels=DIR/labels.csv --set model.img_size=[8,16] --set data.crop_ratio=[1.6,2.5]` (vit_pico,
patch 2: 32 tokens; crops keep the 1:2 shape). The folder's
held-out 10% (carved by vitcli, seed 0) is the evaluation split. Prints one JSON line per run and a table of
the best evaluation's mAP, F1 and threshold with the medians at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from vit_runs import ROOT, pretrain



def write_pairs(folder: Path, n: int) -> Path:
    digits = load_digits()
    rng = np.random.default_rng(0)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        a, b = rng.integers(0, len(digits.images), 2)
        pixels = np.concatenate([digits.images[a], digits.images[b]], axis=1) * 15
        Image.fromarray(pixels.astype(np.uint8)).save(folder / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{';'.join(sorted({str(digits.target[a]), str(digits.target[b])}))}")
    labels = folder / "labels.csv"
    labels.write_text("path,labels\n" + "\n".join(rows) + "\n")
    return labels


def one(seed: int, folder: Path, labels: Path, root: Path) -> dict:
    run = root / f"s{seed}"
    # crops keep the images' 1:2 shape (the quickstart's crop_ratio is about 1:1, which would cut a digit away)
    sets = [f"data.dataset={folder}", f"data.labels={labels}", "model.img_size=[8,16]", "data.crop_ratio=[1.6,2.5]",
            f"train.seed={seed}"]
    pretrain(ROOT / "recipes" / "quickstart.yaml", run, sets)
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    best = max((e for e in events if e["kind"] == "eval"), key=lambda e: e["map"])
    return {"seed": seed, "map": best["map"], "f1": best["f1"], "threshold": best["threshold"], "step": best["step"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--root", default="runs/multilabel_digits_bench")
    args = parser.parse_args()
    root = Path(args.root)
    labels = write_pairs(root / "pairs", args.images)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows.append(one(seed, root / "pairs", labels, root))
        print(json.dumps(rows[-1]), flush=True)
    seeds = " / ".join(f"seed {r['seed']}" for r in rows)
    print(f"\n| metric | {seeds} | median |\n|---|---|---|")
    for key in ("map", "f1", "threshold"):
        values = [r[key] for r in rows]
        fmt = (lambda v: f"{v:.2f}") if key == "threshold" else (lambda v: f"{100 * v:.1f}%")
        print(f"| {key} | {' / '.join(fmt(v) for v in values)} | {fmt(statistics.median(values))} |")


if __name__ == "__main__":
    main()
