"""`vit bench --data DATASET`: the input pipeline alone, in images/s.

The training loader exactly as `vit pretrain` builds it (`vitcli.data.make_loader` over the training
split, or `make_stream_loader` streaming it when DATASET is tar shards, the recipe-default training transforms
at the given resolution: decode, RandomResizedCrop, flip,
normalise; collate), with the host-to-device copy and, for the tensor pipeline on CUDA, the nvJPEG
decode and the crops on the GPU (synchronised). No model runs, so the figure is what the loader could
feed at most. `pipeline` picks data.pipeline (auto | pil | tensor) to compare the two; `cache` data.cache
(the decoding pass it makes before the first batch is reported apart, as cache_seconds).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from vitcli import data as vdata
from vitcli.bench.spec import BenchSpec
from vitcli.bench.timing import Stats, synchronize
from vitcli.engine.runtime import pick_device
from vitcli.errors import VitError


def _batches(loader: vdata.Loader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def bench_data(spec: BenchSpec, *, img_size: tuple[int, int], batch_size: int,
               say: Callable[[str], Any] = lambda message: None) -> dict[str, Any]:
    """Time spec.steps (default 20) batches of spec.data after spec.warmup (default 2; worker start-up
    included there); a JSON-ready dict."""
    dataset, num_workers, pipeline = spec.data, spec.num_workers, spec.pipeline
    steps, warmup = spec.steps or 20, 2 if spec.warmup is None else spec.warmup
    dev = pick_device(spec.device)
    cfg = vdata.TransformSpec(pipeline=pipeline, reduced_decode=spec.reduced_decode)  # the recipe defaults' training transforms
    say(f"loading the training split of {dataset}")
    image_set = vdata.build(vdata.SourceSpec(dataset=dataset, data_dir=spec.data_dir), "train", img_size=img_size, say=say)
    if batch_size > len(image_set) and len(image_set):
        raise VitError(f"--batch-size {batch_size} is larger than the {len(image_set)} training images of {dataset}; lower it.")
    transform = vdata.build_transform(cfg, img_size, train=True)
    batching = vdata.LoaderSpec.training(batch_size, num_workers=num_workers, cache=vdata.CacheSpec(spec.cache),
                                         reuse_buffers=True)  # as the training loop's loader
    if vdata.is_streamed(image_set):  # endless by itself
        loader = vdata.make_stream_loader(image_set, transform, batching, device=dev)
        batches, on_device = iter(loader), loader.stream.decode_on_device
    else:
        t0 = time.perf_counter()
        loader = vdata.make_loader(image_set, transform, batching, device=dev)  # with data.cache, the decoding pass
        cache_seconds = time.perf_counter() - t0
        if loader.cache_note:
            say(loader.cache_note)
        batches, on_device = _batches(loader), loader.dataset.decode_on_device

    def next_batch() -> int:
        images, _ = next(batches)  # delivered on dev (copied, and decoded there when on_device)
        synchronize(dev)
        return len(images)

    try:
        t0 = time.perf_counter()
        next_batch()
        first = time.perf_counter() - t0
        for _ in range(max(0, warmup - 1)):
            next_batch()
        say(f"timing {steps} batches of {batch_size} ({num_workers} workers)")
        times, images = [], 0
        for _ in range(steps):
            t0 = time.perf_counter()
            images += next_batch()
            times.append(time.perf_counter() - t0)
    finally:
        loader.close()
    s = Stats.of(times)
    return {
        "dataset": image_set.name,
        "split": image_set.split,
        "num_images": len(image_set),
        "img_size": list(img_size),
        "batch_size": batch_size,
        "num_workers": num_workers,
        "device": dev.type,
        "steps": steps,
        "warmup": warmup,
        "images_per_second": images / sum(times),
        "batch_ms_median": 1000 * s.median,
        "batch_ms_iqr": 1000 * s.iqr,
        "first_batch_seconds": round(first, 3),
        "pipeline": "tensor" if cfg.tensor_pipeline else "pil",
        "decode_on_device": on_device,
        "reduced_decode": cfg.tensor_pipeline and spec.reduced_decode and not on_device,
        "streamed": vdata.is_streamed(image_set),
        "cache": spec.cache if not vdata.is_streamed(image_set) else "none",
        "cache_seconds": None if vdata.is_streamed(image_set) else round(cache_seconds, 3),
        "transforms": repr(transform),
    }
