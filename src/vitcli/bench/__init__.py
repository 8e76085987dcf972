"""Benchmarks: how fast a model trains or infers here, how close to the hardware, and against timm.

    from vitcli.bench import BenchSpec, run_bench, print_bench
    result = run_bench(BenchSpec("vit_s16", compare="timm", batch_size=16))     # what `vit bench` runs
    result = run_bench(BenchSpec(data="digits", img_size=(8, 8)))               # the input pipeline alone

Modules: timing (warm-up, interleaved rounds, device sync), flops (FlopCounterMode and the closed form),
hardware (GPU peak table, matmul probe), memory, steps (models and their train/infer step),
model_bench, data_bench, report (tables). docs/benchmarks.md has the measured figures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vitcli.bench.report import print_bench
from vitcli.bench.spec import BenchSpec

__all__ = ["BenchSpec", "print_bench", "run_bench"]


def run_bench(spec: BenchSpec, say: Callable[[str], Any] = lambda message: None) -> dict[str, Any]:
    """Benchmark the spec's model, the input pipeline of its data set, or both; one JSON-ready dict.

    With a model: the model_bench keys (model, mode, device, ..., vitcli, timm, ratio). Always a `data`
    key (None without --data). With both, `bottleneck` says which is slower ("loader" or "model").
    """
    from vitcli.bench.data_bench import bench_data
    from vitcli.bench.model_bench import bench_model

    data_result = None
    if spec.data is not None:  # first: a data set that cannot be read fails before minutes of model timing
        size, batch = spec.img_size or (224, 224), spec.batch_size or 64
        if spec.model is not None:  # the model's resolution and default batch
            from vitcli.bench.model_bench import defaults
            from vitcli.engine.runtime import pick_device
            from vitcli.models import resolve_config

            size = spec.img_size or resolve_config(spec.model).img_size
            batch = spec.batch_size or defaults(pick_device(spec.device), spec.compile)["batch_size"]
        data_result = bench_data(spec, img_size=size, batch_size=batch, say=say)
    timed = spec.model is not None and not spec.loader_only
    result: dict[str, Any] = bench_model(spec, say=say) if timed else {}
    result["data"] = data_result
    if timed and spec.data is not None:
        loader, step = result["data"]["images_per_second"], result["vitcli"]["images_per_second"]
        result["bottleneck"] = "loader" if loader < step else "model"
        verdict = ("the loader is the bottleneck: add --num-workers, or decode at a lower cost"
                   if loader < step else "the model is the bottleneck: the loader keeps up")
        result["bottleneck_note"] = (f"input pipeline {loader:,.0f} images/s vs {spec.mode} step {step:,.0f} images/s: "
                                     f"{verdict} ({loader / step:.1f}x).")
    return result
