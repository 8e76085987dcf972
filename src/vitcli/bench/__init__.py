"""Benchmarks: how fast a model trains or infers here, how close to the hardware, and against timm.

    from vitcli.bench import run_bench, print_bench
    result = run_bench("vit_s16", compare="timm", batch_size=16)       # what `vit bench` runs
    result = run_bench(None, data="digits", img_size=(8, 8))           # the input pipeline alone

Modules: timing (warm-up, interleaved rounds, device sync), flops (FlopCounterMode and the closed form),
hardware (GPU peak table, matmul probe), memory, steps (models and their train/infer step),
model_bench, data_bench, report (tables). docs/benchmarks.md has the measured figures.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vitcli.bench.report import print_bench
from vitcli.errors import VitError

__all__ = ["print_bench", "run_bench"]


def run_bench(
    model: str | None,
    *,
    data: str | None = None,
    mode: str = "train",
    batch_size: int | None = None,
    img_size: tuple[int, int] | None = None,
    dtype: str = "auto",
    compile: bool = False,
    compare: str | None = None,
    device: str = "auto",
    steps: int | None = None,
    warmup: int | None = None,
    num_workers: int = 2,
    data_dir: str | None = None,
    pipeline: str = "auto",
    reduced_decode: bool = True,
    peak_tflops: float | None = None,
    objective: str = "supervised",
    say: Callable[[str], Any] = lambda message: None,
) -> dict[str, Any]:
    """Benchmark MODEL, the input pipeline of DATA, or both; one JSON-ready dict.

    With a model: the model_bench keys (model, mode, device, ..., vitcli, timm, ratio). Always a `data`
    key (None without --data). With both, `bottleneck` says which is slower ("loader" or "model").
    """
    from vitcli.bench.data_bench import bench_data
    from vitcli.bench.model_bench import bench_model

    if model is None and data is None:
        raise VitError("Name a model to benchmark (e.g. `vit bench vit_s16`), or --data DATASET for the input pipeline.")
    if compare is not None and compare != "timm":
        raise VitError(f"--compare {compare!r}: the only library to compare with is timm (--compare timm).")
    data_result = None
    if data is not None:  # first: a data set that cannot be read fails before minutes of model timing
        size, batch = img_size or (224, 224), batch_size or 64
        if model is not None:  # the model's resolution and default batch
            from vitcli.bench.model_bench import defaults
            from vitcli.engine.runtime import pick_device
            from vitcli.models import resolve_config

            size = img_size or resolve_config(model).img_size
            batch = batch_size or defaults(pick_device(device), compile)["batch_size"]
        data_result = bench_data(data, img_size=size, batch_size=batch, num_workers=num_workers, steps=steps or 20,
                                 warmup=2 if warmup is None else warmup, device=device, data_dir=data_dir,
                                 pipeline=pipeline, reduced_decode=reduced_decode, say=say)
    result: dict[str, Any] = {}
    if model is not None:
        result = bench_model(model, mode=mode, batch_size=batch_size, img_size=img_size, dtype=dtype, compile=compile,
                             compare=compare, device=device, steps=steps, warmup=warmup, peak_tflops=peak_tflops,
                             objective=objective, say=say)
    result["data"] = data_result
    if model is not None and data is not None:
        loader, step = result["data"]["images_per_second"], result["vitcli"]["images_per_second"]
        result["bottleneck"] = "loader" if loader < step else "model"
        verdict = ("the loader is the bottleneck: add --num-workers, or decode at a lower cost"
                   if loader < step else "the model is the bottleneck: the loader keeps up")
        result["bottleneck_note"] = (f"input pipeline {loader:,.0f} images/s vs {mode} step {step:,.0f} images/s: "
                                     f"{verdict} ({loader / step:.1f}x).")
    return result
