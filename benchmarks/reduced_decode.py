"""Reduced-size JPEG decoding (data.reduced_decode) against full-size decoding, on a folder and its tar shards.

    .venv/bin/python benchmarks/jpeg_folder.py runs/bench/jpegs1600 --images 1000 --long-side 1600
    .venv/bin/vit shards runs/bench/jpegs1600 runs/bench/jpeg1600-shards --samples-per-shard 50
    .venv/bin/python benchmarks/reduced_decode.py runs/bench/jpegs1600 runs/bench/jpeg1600-shards --repeat 3

Runs `vit bench --data SOURCE --full-decode` and `--reduced-decode` one after the other for each source,
`--repeat` times, so each pair shares the machine's state; prints every figure and the reduced / full
ratio pair by pair (a shared machine's speed drifts between minutes, so only paired ratios compare).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

VIT = str(Path(sys.executable).with_name("vit"))


def images_per_second(source: str, decode: str, args: argparse.Namespace) -> float:
    command = [VIT, "bench", "--data", source, "--res", str(args.res), "--batch-size", str(args.batch_size),
               "--num-workers", str(args.num_workers), "--steps", str(args.steps), f"--{decode}-decode", "--json"]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out)["data"]["images_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", help="image folders or shard folders")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--res", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    print("| source | full decode, images/s | reduced decode, images/s | reduced / full, pair by pair |")
    print("| --- | --- | --- | --- |")
    for source in args.sources:
        full, reduced = [], []
        for _ in range(args.repeat):
            full.append(images_per_second(source, "full", args))
            reduced.append(images_per_second(source, "reduced", args))
        ratios = [r / f for r, f in zip(reduced, full)]
        print(f"| {source} | {' / '.join(f'{x:.1f}' for x in full)} | {' / '.join(f'{x:.1f}' for x in reduced)} | "
              f"{' / '.join(f'{x:.2f}' for x in ratios)} (median {statistics.median(ratios):.2f}) |", flush=True)


if __name__ == "__main__":
    main()
