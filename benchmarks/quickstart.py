"""The quickstart's figure: wall time of `vit pretrain recipes/quickstart.yaml` and time to 97% top-1.

    .venv/bin/python benchmarks/quickstart.py                # one run into runs/bench-quickstart
    .venv/bin/python benchmarks/quickstart.py --repeat 3 --set data.num_workers=1

Reads the run's metrics.jsonl: `wall_seconds` of the first evaluation with top1 >= 0.97 is the time to
97%; the training images/s is the mean of the logged `train` events (data loading included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(out: Path, overrides: list[str]) -> dict:
    cmd = [str(ROOT / ".venv" / "bin" / "vit"), "pretrain", str(ROOT / "recipes" / "quickstart.yaml"),
           "--out", str(out), "--force"]
    for o in overrides:
        cmd += ["--set", o]
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evals = [e for e in events if e["kind"] == "eval"]
    first97 = next((e for e in evals if e["top1"] >= 0.97), None)
    ips = [e["images_per_second"] for e in events if e["kind"] == "train"]
    return {
        "wall_seconds": round(wall, 2),
        "time_to_97": first97["wall_seconds"] if first97 else None,
        "epoch_at_97": first97["epoch"] if first97 else None,
        "best_top1": max(e["top1"] for e in evals),
        "final_top1": evals[-1]["top1"],
        "train_images_per_second": round(statistics.fmean(ips), 1) if ips else None,
        "load_average": [round(load, 2), round(os.getloadavg()[0], 2)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-quickstart")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override, repeatable")
    args = ap.parse_args()
    for _ in range(args.repeat):
        print(json.dumps(one_run(args.out, args.overrides)))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
