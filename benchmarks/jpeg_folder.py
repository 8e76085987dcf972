"""Write an ImageNet-like image folder of JPEGs for input-pipeline benchmarks (`vit bench --data DIR`).

    .venv/bin/python benchmarks/jpeg_folder.py runs/bench/jpegs --images 2000
    .venv/bin/vit bench --data runs/bench/jpegs --res 224 --pipeline pil --num-workers 2
    .venv/bin/vit bench --data runs/bench/jpegs --res 224 --pipeline tensor --num-workers 2

ImageNet-1k training images average about 400x350 pixels and 110 KB; these are sized like them
(longer side 500, the other 333-500, a few portrait ones), quality 90, with photo-like content: a
smooth random field plus fine grain, so the entropy decoder has real work. 10 classes, no splits
(vitcli holds out a stratified 10% for evaluation).

`--long-side 1600` writes larger photos (the other side 2/3 to 1 of it), as cameras and web crawls
give before anyone resizes them: the case where reduced-size decoding (data.reduced_decode) applies.
The grain stays per pixel (`--grain`, the noise's standard deviation in grey levels, default 12), so
these are as hard for the entropy decoder per pixel as the small ones (~3.3 bits per pixel at quality
90); `--grain 4` gives ~1.85 bits per pixel, nearer what a camera photo scaled down to that size carries.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image


def photo_like(rng: np.random.Generator, width: int, height: int, grain: float = 12.0) -> Image.Image:
    coarse = rng.integers(0, 256, size=(max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.int16)
    grain = rng.normal(0, grain, size=(height, width, 3))
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--long-side", type=int, default=500, help="pixels on the longer side (default 500: ImageNet-like)")
    parser.add_argument("--grain", type=float, default=12.0, help="per-pixel noise, in grey levels (default 12)")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    total = pixels = 0
    for i in range(args.images):
        long = args.long_side
        short = int(rng.integers(round(long * 2 / 3), long + 1))
        width, height = (long, short) if rng.random() < 0.8 else (short, long)
        folder = args.out / f"class{i % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:06d}.jpg"
        photo_like(rng, width, height, args.grain).save(path, "JPEG", quality=90)
        total += path.stat().st_size
        pixels += width * height
    print(f"wrote {args.images} JPEGs to {args.out} (mean {total / args.images / 1024:.0f} KiB, "
          f"{8 * total / pixels:.2f} bits per pixel)")


if __name__ == "__main__":
    main()
