"""Self-supervised pretraining on the 1,437 training digits, without their labels, against a random init.

    .venv/bin/python benchmarks/ssl_digits.py                          # mae and mpp, seeds 0-2
    .venv/bin/python benchmarks/ssl_digits.py --objective mae --seeds 0 --labels 144

For each objective and seed: `vit pretrain recipes/<objective>_digits.yaml` (wall time), a randomly
initialised model of the same shape saved with the same metadata, `vit eval --fewshot 10` of both (frozen
features, 360 held-out digits), and `vit finetune` of both on `--labels` labelled digits
(`--set data.train_subset=N`, the shipped digits fine-tuning recipe with `--finetune-set` on top, by default
`optim.lr=0.1`; the random init gets exactly the same fine-tuning, MAE's defaults included). Prints one JSON line per run and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from vit_runs import ROOT, vit


def random_init(run: Path, seed: int, out: Path) -> Path:
    """The pretrained run's model shape, randomly initialised (seeded), with the run's checkpoint metadata."""
    from vitcli.io.checkpoint import read_weights
    from vitcli.io.meta import CheckpointMeta
    from vitcli.models import create_model
    from vitcli.models.adapt import save_state_dict

    _, meta = read_weights(run / "checkpoints" / "best" / "model.safetensors")
    torch.manual_seed(seed)
    model = create_model(meta["model"], **meta["model_args"])
    return save_state_dict(out, model.state_dict(), CheckpointMeta.from_dict({**meta, "step": 0, "score": None}))


def fewshot(ckpt: Path, shots: int) -> float:
    return json.loads(vit("eval", "--ckpt", str(ckpt), "--fewshot", str(shots), "--num-workers", "0", "--json"))["fewshot"][str(shots)]


def finetune(ckpt: Path, out: Path, labels: int, seed: int, overrides: list[str]) -> dict:
    sets = [x for o in [f"data.train_subset={labels}", f"train.seed={seed}", *overrides] for x in ("--set", o)]
    vit("finetune", "--ckpt", str(ckpt), "--out", str(out), "--force", *sets)
    return json.loads((out / "summary.json").read_text())


def one(objective: str, seed: int, labels: int, shots: int, root: Path, overrides: list[str],
        ft_overrides: list[str]) -> dict:
    run = root / f"{objective}-s{seed}"
    sets = [x for o in [f"train.seed={seed}", *overrides] for x in ("--set", o)]
    t0 = time.perf_counter()
    vit("pretrain", str(ROOT / "recipes" / f"{objective}_digits.yaml"), "--out", str(run), "--force", *sets)
    wall = time.perf_counter() - t0
    rand = random_init(run, seed, root / f"random-{objective}-s{seed}.safetensors")
    ours_ft = finetune(run, root / f"{objective}-s{seed}-ft{labels}", labels, seed, ft_overrides)
    rand_ft = finetune(rand, root / f"random-{objective}-s{seed}-ft{labels}", labels, seed, ft_overrides)
    return {
        "objective": objective, "seed": seed, "pretrain_wall_seconds": round(wall, 1),
        f"fewshot_{shots}": fewshot(run, shots), f"random_fewshot_{shots}": fewshot(rand, shots),
        f"finetune_{labels}_best": ours_ft["best_top1"], f"finetune_{labels}_final": ours_ft["final_top1"],
        f"random_finetune_{labels}_best": rand_ft["best_top1"], f"random_finetune_{labels}_final": rand_ft["final_top1"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objective", nargs="+", default=["mae", "mpp"], choices=["mae", "mpp"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--labels", type=int, default=144)
    ap.add_argument("--shots", type=int, default=10)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "ssl-digits")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="pretraining recipe override")
    ap.add_argument("--finetune-set", dest="ft_overrides", action="append", default=None,
                    help="fine-tuning override, for both inits (default: optim.lr=0.1)")
    args = ap.parse_args()
    ft_overrides = ["optim.lr=0.1"] if args.ft_overrides is None else args.ft_overrides
    rows = []
    for objective in args.objective:
        for seed in args.seeds:
            rows.append(one(objective, seed, args.labels, args.shots, args.out, args.overrides, ft_overrides))
            print(json.dumps(rows[-1]), flush=True)
    keys = [k for k in rows[0] if k not in ("objective", "seed")]
    print("\n| objective | " + " | ".join(keys) + " |\n|" + " --- |" * (len(keys) + 1))
    for objective in args.objective:
        mine = [r for r in rows if r["objective"] == objective]
        medians = [statistics.median(r[k] for r in mine) for k in keys]
        print(f"| {objective} (median of {len(mine)}) | " + " | ".join(f"{m:.4g}" for m in medians) + " |")


if __name__ == "__main__":
    main()
