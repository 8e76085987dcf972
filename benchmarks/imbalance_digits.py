"""Imbalanced classes on digits: a 20:1 long tail of the training split, and what each remedy does for it.

    .venv/bin/python benchmarks/imbalance_digits.py                    # seeds 0-2, ratio 20
    .venv/bin/python benchmarks/imbalance_digits.py --seeds 0 --ratio 50

For each seed and `data.balance` setting (none, sampler, loss_weights by inverse frequency, loss_weights by
effective number): `vit pretrain recipes/quickstart.yaml --set data.imbalance=RATIO --set data.balance=...`,
then `vit eval --ckpt RUN --json` on the 360 held-out digits (balanced: ~36 per class). Prints one JSON line
per run and a table of balanced accuracy and top-1 with the medians at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from vit_runs import ROOT, pretrain, vit

SETTINGS = {
    "none": ["data.balance=none"],
    "sampler": ["data.balance=sampler"],
    "loss_weights (inverse)": ["data.balance=loss_weights", "data.class_weights=inverse"],
    "loss_weights (effective)": ["data.balance=loss_weights", "data.class_weights=effective"],
}


def one(setting: str, seed: int, ratio: float, root: Path) -> dict:
    run = root / f"{setting.split()[0]}{'-eff' if 'effective' in setting else ''}-s{seed}"
    sets = [f"data.imbalance={ratio}", f"train.seed={seed}", *SETTINGS[setting]]
    pretrain(ROOT / "recipes" / "quickstart.yaml", run, sets)
    scores = json.loads(vit("eval", "--ckpt", str(run), "--num-workers", "0", "--json"))
    return {"setting": setting, "seed": seed, "balanced_accuracy": scores["balanced_accuracy"], "top1": scores["top1"],
            "worst_class": min(a for a in scores["per_class_accuracy"] if a is not None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--ratio", type=float, default=20.0)
    parser.add_argument("--root", default="runs/imbalance_digits_bench")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for setting in SETTINGS:
        for seed in seeds:
            rows.append(one(setting, seed, args.ratio, Path(args.root)))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n| data.balance | balanced accuracy ({' / '.join(f'seed {s}' for s in seeds)}) | median | top-1 median | worst class, median |")
    print("|---|---|---|---|---|")
    for setting in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting]
        bal = [r["balanced_accuracy"] for r in mine]
        print(f"| {setting} | {' / '.join(f'{100 * b:.1f}%' for b in bal)} | {100 * statistics.median(bal):.1f}% | "
              f"{100 * statistics.median(r['top1'] for r in mine):.1f}% | {100 * statistics.median(r['worst_class'] for r in mine):.1f}% |")


if __name__ == "__main__":
    main()
