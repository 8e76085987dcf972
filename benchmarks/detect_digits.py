"""Detection on digits-det: FCOS on ViTDet's simple feature pyramid over three encoders (the quickstart's, an
MAE encoder from recipes/mae_digits.yaml, a random initialisation), recipes/detect_digits.yaml; or Mask R-CNN,
recipes/instance_digits.yaml (`--recipe`), whose runs also report mask AP.

    .venv/bin/python benchmarks/detect_digits.py                        # seeds 0-2, all 2,000 train canvases
    .venv/bin/python benchmarks/detect_digits.py --seeds 0 --subsets 0,100
    .venv/bin/python benchmarks/detect_digits.py --recipe recipes/instance_digits.yaml --seeds 0

The two encoders are pretrained once (seed 0): `vit pretrain recipes/quickstart.yaml` and `vit pretrain
recipes/mae_digits.yaml`. Each detection run is `vit finetune --ckpt ENCODER --recipe RECIPE --set train.seed=S`
(random init: `vit pretrain` of the same recipe with model.name vit_pico); with a subset of N training
canvases (`data.train_subset=N`) the epochs grow so the run takes the recipe's number of steps.
Reports each run's best AP / AP50 (and mask AP / AP50) over the 500 val canvases (pycocotools) and its wall time:
one JSON line per run and a table at the end. Runs already under --root (default runs/RECIPE_bench) are read,
not rerun (delete the root to start over).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from vit_runs import ROOT, digits_encoders, pretrain, vit
from vitcli.recipe import load_recipe

TRAIN_IMAGES = 2000  # digits-det's training canvases


def same_steps_epochs(recipe: Path, subset: int) -> int:
    """Epochs over `subset` canvases that take the recipe's number of steps."""
    train = load_recipe(recipe).train
    steps = train.epochs * (TRAIN_IMAGES // train.batch_size)
    return math.ceil(steps / max(1, subset // train.batch_size))


def detect(recipe: Path, encoder: Path | None, seed: int, subset: int, out: Path) -> dict:
    if (out / "summary.json").exists():  # finished by an earlier call: the script picks up where it stopped
        return json.loads((out / "summary.json").read_text())
    sets = [f"train.seed={seed}"]
    if subset:
        sets += [f"data.train_subset={subset}", f"train.epochs={same_steps_epochs(recipe, subset)}"]
    if encoder is None:
        return pretrain(recipe, out, ["model.name=vit_pico", *sets])
    vit("finetune", "--ckpt", str(encoder), "--recipe", str(recipe), "--out", str(out), "--force",
        *[x for s in sets for x in ("--set", s)])
    return json.loads((out / "summary.json").read_text())


def best_eval(run: Path) -> dict:
    """The eval record with the best AP in the run's metrics.jsonl."""
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "ap50" in r]
    return max(evals, key=lambda r: r["ap"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--subsets", default="0", help="training canvases per run, comma-separated (0: all 2,000)")
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "detect_digits.yaml"))
    parser.add_argument("--root", help="where the runs go (default runs/RECIPE_bench)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    subsets = [int(s) for s in args.subsets.split(",")]
    recipe = Path(args.recipe)
    root = Path(args.root or f"runs/{recipe.stem}_bench")
    rows = []
    for subset in subsets:
        for name, encoder in digits_encoders(root).items():
            for seed in seeds:
                out = root / f"{name.split()[0]}-n{subset or TRAIN_IMAGES}-s{seed}"
                summary = detect(recipe, encoder, seed, subset, out)
                best = best_eval(out)
                rows.append({"encoder": name, "train_images": subset or TRAIN_IMAGES, "seed": seed, "ap": best["ap"],
                             "ap50": best["ap50"], **{k: best[k] for k in ("mask_ap", "mask_ap50") if k in best},
                             "wall_seconds": summary["wall_seconds"]})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n| train canvases | encoder | AP / AP50 ({', '.join(f'seed {s}' for s in seeds)}) | median AP50 | minutes |"
          "\n|---|---|---|---|---|")
    for subset in subsets:
        for name in ("quickstart", "mae_digits", "random init"):
            got = [r for r in rows if r["encoder"] == name and r["train_images"] == (subset or TRAIN_IMAGES)]
            pairs = ", ".join(f"{100 * r['ap']:.1f} / {100 * r['ap50']:.1f}" + (f" (mask {100 * r['mask_ap']:.1f} / "
                              f"{100 * r['mask_ap50']:.1f})" if "mask_ap" in r else "") for r in got)
            minutes = statistics.median(r["wall_seconds"] for r in got) / 60
            print(f"| {subset or TRAIN_IMAGES} | {name} | {pairs} | {100 * statistics.median(r['ap50'] for r in got):.1f} | "
                  f"{minutes:.1f} |")


if __name__ == "__main__":
    main()
