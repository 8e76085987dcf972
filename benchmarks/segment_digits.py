"""Segmentation on digits-seg: a linear and a mask-transformer decoder on three encoders (the quickstart's,
an MAE encoder from recipes/mae_digits.yaml, a random initialisation), recipes/segment_digits.yaml (linear)
and recipes/segment_digits_mask.yaml (mask transformer).

    .venv/bin/python benchmarks/segment_digits.py                      # seeds 0-2
    .venv/bin/python benchmarks/segment_digits.py --seeds 0
    .venv/bin/python benchmarks/segment_digits.py --seeds 1,2 --decoders linear

The two encoders are pretrained once (seed 0): `vit pretrain recipes/quickstart.yaml` and `vit pretrain
recipes/mae_digits.yaml`. Each segmentation run is `vit finetune --ckpt ENCODER --recipe
recipes/segment_digits[_mask].yaml --set train.seed=S` (random init: `vit pretrain` of the same recipe
with model.name vit_pico), 20 epochs at 32x32; its best mIoU over the 500 val canvases, its wall time and
the minutes to its first evaluation at 80% mIoU or more.
Prints one JSON line per run and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from vit_runs import ROOT, digits_encoders, pretrain, vit

# one recipe per decoder: the mask transformer needs a decoder rate of its own (its recipe's header says why)
RECIPES = {"linear": ROOT / "recipes" / "segment_digits.yaml", "mask_transformer": ROOT / "recipes" / "segment_digits_mask.yaml"}
DECODERS = tuple(RECIPES)


def segment(encoder: Path | None, decoder: str, seed: int, out: Path) -> dict:
    sets = [f"train.seed={seed}"]
    if encoder is None:
        return pretrain(RECIPES[decoder], out, ["model.name=vit_pico", *sets])
    vit("finetune", "--ckpt", str(encoder), "--recipe", str(RECIPES[decoder]), "--out", str(out), "--force",
        *[x for s in sets for x in ("--set", s)])
    return json.loads((out / "summary.json").read_text())


def minutes_to(run: Path, miou: float) -> float | None:
    """Minutes into the run at the first evaluation that reached `miou` (the issue's goal: 0.80 within 5), or None."""
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("kind") == "eval" and row.get("miou", 0) >= miou:
            return row["wall_seconds"] / 60
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--decoders", default=",".join(DECODERS))
    parser.add_argument("--root", default="runs/segment_digits_bench")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    decoders = [d for d in args.decoders.split(",") if d in DECODERS]
    root = Path(args.root)
    rows = []
    for name, encoder in digits_encoders(root).items():
        for decoder in decoders:
            for seed in seeds:
                run = root / f"{name.split()[0]}-{decoder}-s{seed}"
                summary = segment(encoder, decoder, seed, run)
                rows.append({"encoder": name, "decoder": decoder, "seed": seed, "best_miou": summary["best_score"],
                             "wall_seconds": summary["wall_seconds"], "minutes_to_80": minutes_to(run, 0.80)})
                print(json.dumps(rows[-1]), flush=True)
    print(f"\n| encoder | decoder | best mIoU ({' / '.join(f'seed {s}' for s in seeds)}) | median | minutes | minutes to 80% |"
          "\n|---|---|---|---|---|---|")
    for name in ("quickstart", "mae_digits", "random init"):
        for decoder in decoders:
            got = [r for r in rows if r["encoder"] == name and r["decoder"] == decoder]
            values = [r["best_miou"] for r in got]
            minutes = statistics.median(r["wall_seconds"] for r in got) / 60
            to_80 = " / ".join("-" if r["minutes_to_80"] is None else f"{r['minutes_to_80']:.1f}" for r in got)
            print(f"| {name} | {decoder} | {' / '.join(f'{100 * v:.1f}%' for v in values)} | "
                  f"{100 * statistics.median(values):.1f}% | {minutes:.1f} | {to_80} |")


if __name__ == "__main__":
    main()
