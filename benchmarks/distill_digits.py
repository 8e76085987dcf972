"""DeiT's claim in miniature: with few labels, a ViT distilled from a CNN beats the same ViT trained alone.

    .venv/bin/python benchmarks/distill_digits.py                      # seeds 0-2
    .venv/bin/python benchmarks/distill_digits.py --seeds 0 --distill-set objective.distill.type=hard

For each seed, on the same 300 labelled training digits (`data.train_subset: 300`), evaluated on the 360
held-out digits:
- teacher: `vit pretrain recipes/cnn_teacher_digits.yaml` (timm's ResNet-18 at 32 px);
- distilled: `vit pretrain recipes/distill_digits.yaml --set objective.distill.teacher=TEACHER` (vit_pico);
- alone: `vit pretrain recipes/quickstart.yaml --set data.train_subset=300` (the quickstart's schedule);
- alone, same schedule: the same with the distillation recipe's epochs, so only the teacher differs.
Prints one JSON line per seed and a table of best top-1 with the medians at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml
from vit_runs import ROOT, pretrain

LABELS = 300


def timed(recipe: str, out: Path, sets: list[str]) -> tuple[float, float]:
    """(best top-1, wall seconds) of one run."""
    start = time.perf_counter()
    return pretrain(recipe, out, sets)["best_top1"], time.perf_counter() - start


def one(seed: int, root: Path, distill_sets: list[str]) -> dict:
    epochs = yaml.safe_load((ROOT / "recipes" / "distill_digits.yaml").read_text())["train"]["epochs"]
    alone = [f"data.train_subset={LABELS}", f"train.seed={seed}"]
    teacher = root / f"teacher-s{seed}"
    out = {"seed": seed}
    out["teacher"], out["teacher_s"] = timed(str(ROOT / "recipes" / "cnn_teacher_digits.yaml"), teacher, [f"train.seed={seed}"])
    out["distilled"], out["distilled_s"] = timed(str(ROOT / "recipes" / "distill_digits.yaml"), root / f"distilled-s{seed}",
                                                    [f"train.seed={seed}", f"objective.distill.teacher={teacher}", *distill_sets])
    out["alone"], out["alone_s"] = timed(str(ROOT / "recipes" / "quickstart.yaml"), root / f"alone-s{seed}", alone)
    out["alone_same_schedule"], out["alone_same_schedule_s"] = timed(
        str(ROOT / "recipes" / "quickstart.yaml"), root / f"alone-long-s{seed}", [*alone, f"train.epochs={epochs}"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--root", default="runs/distill_digits_bench")
    parser.add_argument("--distill-set", action="append", default=[], help="more --set overrides of the distilled run")
    args = parser.parse_args()
    root = Path(args.root)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows.append(one(seed, root, args.distill_set))
        print(json.dumps(rows[-1]), flush=True)
    seeds = " | ".join(f"seed {r['seed']}" for r in rows)
    print(f"\n| run | {seeds} | median |\n|---|{'---|' * (len(rows) + 1)}")
    for key in ("teacher", "distilled", "alone", "alone_same_schedule"):
        values = [r[key] for r in rows]
        print(f"| {key} | {' | '.join(f'{100 * v:.1f}%' for v in values)} | {100 * statistics.median(values):.1f}% |")
    for base in ("alone", "alone_same_schedule"):
        gain = statistics.median(r["distilled"] for r in rows) - statistics.median(r[base] for r in rows)
        print(f"distilled - {base}: {100 * gain:+.1f} points (medians)")


if __name__ == "__main__":
    main()
