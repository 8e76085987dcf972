"""Frozen features on digits: DINO, MAE and MPP pretrained without labels, a random init, raw pixels and the
supervised quickstart, each judged by weighted 20-NN, a linear probe and closed-form 10-shot accuracy.

    .venv/bin/python benchmarks/frozen_digits.py                       # seeds 0-2
    .venv/bin/python benchmarks/frozen_digits.py --seeds 0 --objectives dino

For each objective and seed: `vit pretrain recipes/<objective>_digits.yaml --set train.seed=S` (its wall time;
a run already finished under --out is reused),
then `vit eval --ckpt RUN/checkpoints/last --knn 20 --linear-probe --fewshot 10 --json` (the final weights: a
run's best is chosen on these same digits) on the 360 held-out digits (the 1,437
training digits are the neighbours and the probe's training set). The random init is the DINO run's model
shape, randomly initialised (seeded), saved with the same metadata. Reference rows: k-NN on the raw pixels
(objectives.knn on the flattened, normalised 8x8 images) and the supervised quickstart's features
(`vit pretrain recipes/quickstart.yaml`, seed 0). Prints one JSON line per row and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch

from vit_runs import ROOT, vit

OBJECTIVES = ("dino", "mae", "mpp")


def frozen(ckpt: Path) -> dict:
    out = json.loads(vit("eval", "--ckpt", str(ckpt), "--dataset", "digits", "--knn", "20", "--linear-probe",
                         "--fewshot", "10", "--num-workers", "0", "--json"))
    return {"knn_20": out["knn"]["20"], "linear_probe": out["linear_probe"]["accuracy"], "probe_lr": out["linear_probe"]["lr"],
            "fewshot_10": out["fewshot"]["10"]}


def last_checkpoint(run: Path) -> Path:
    """The run's final weights: its "best" is chosen by 20-NN on the same held-out digits the table reports."""
    return run / "checkpoints" / "last" / "model.safetensors"


def random_init(run: Path, seed: int, out: Path) -> Path:
    """The run's model shape, randomly initialised (seeded), with the run's checkpoint metadata."""
    from vitcli.io.checkpoint import read_weights
    from vitcli.io.meta import CheckpointMeta
    from vitcli.models import create_model
    from vitcli.models.adapt import save_state_dict

    _, meta = read_weights(last_checkpoint(run))
    torch.manual_seed(seed)
    model = create_model(meta["model"], **meta["model_args"])
    return save_state_dict(out, model.state_dict(), CheckpointMeta.from_dict({**meta, "step": 0, "score": None}))


def raw_pixels() -> dict:
    from vitcli import data as vdata
    from vitcli.objectives.knn import knn_accuracy

    def arrays(split):
        images = np.stack([np.asarray(img, dtype=np.float32).ravel() / 255 for img in split.dataset["image"]])
        return images - 0.5, np.asarray(split.dataset["label"])

    train_x, train_y = arrays(vdata.load_split("digits", None, role="train", seed=0))
    test_x, test_y = arrays(vdata.load_split("digits", role="eval"))
    return {"knn_20": knn_accuracy(train_x, train_y, test_x, test_y, 10, (20,))["20"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=OBJECTIVES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "frozen-digits")
    args = ap.parse_args()
    rows = [{"features": "raw pixels", "seed": None, **raw_pixels()}]
    print(json.dumps(rows[-1]), flush=True)
    quick = args.out / "quickstart"
    if not (quick / "summary.json").exists():
        vit("pretrain", str(ROOT / "recipes" / "quickstart.yaml"), "--out", str(quick), "--force")
    rows.append({"features": "supervised quickstart", "seed": 0, **frozen(quick)})
    print(json.dumps(rows[-1]), flush=True)
    for objective in args.objectives:
        for seed in args.seeds:
            run = args.out / f"{objective}-s{seed}"
            if not (run / "summary.json").exists():  # a finished run is kept: the script can be re-run after a stop
                vit("pretrain", str(ROOT / "recipes" / f"{objective}_digits.yaml"), "--out", str(run), "--force",
                    "--set", f"train.seed={seed}")
            wall = json.loads((run / "summary.json").read_text())["wall_seconds"]
            rows.append({"features": objective, "seed": seed, "pretrain_seconds": round(wall, 1), **frozen(last_checkpoint(run))})
            print(json.dumps(rows[-1]), flush=True)
            if objective == args.objectives[0]:
                rand = random_init(run, seed, args.out / f"random-s{seed}.safetensors")
                rows.append({"features": "random init", "seed": seed, **frozen(rand)})
                print(json.dumps(rows[-1]), flush=True)
    metrics = ("knn_20", "linear_probe", "fewshot_10", "pretrain_seconds")
    print("\n| features | 20-NN | linear probe | 10-shot | pretraining (s) |\n| --- | --- | --- | --- | --- |")
    for name in dict.fromkeys(r["features"] for r in rows):
        mine = [r for r in rows if r["features"] == name]
        cells = []
        for m in metrics:
            values = [r[m] for r in mine if m in r]
            if not values:
                cells.append("-")
            elif m == "pretrain_seconds":
                cells.append(f"{min(values):.0f}-{max(values):.0f}")
            else:
                per_seed = " / ".join(f"{100 * v:.1f}" for v in values)
                cells.append(f"{per_seed} (median {100 * statistics.median(values):.1f}%)" if len(values) > 1 else f"{100 * values[0]:.1f}%")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
