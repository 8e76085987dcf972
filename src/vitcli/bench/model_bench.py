"""`vit bench MODEL`: images/s, step time, peak memory and FLOP/s of a training or inference step.

    result = bench_model("vit_s16", mode="train", batch_size=16, compare="timm")
    result["vitcli"]["images_per_second"], result["timm"]["images_per_second"], result["ratio"]

Order of work: build the model(s) -> warm up each (compilation happens here) -> count one step's FLOPs
(eager, FlopCounterMode) -> time `steps` steps of each model and of the matmul probe in interleaved
rounds (CUDA: peak memory of those steps) -> CPU: peak memory of one more eager step -> statistics.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

from vitcli.bench import memory
from vitcli.bench.flops import count_flops
from vitcli.bench.hardware import MatmulProbe, device_name, peak_flops
from vitcli.bench.steps import MODES, ModelUnderTest, build_models, prepare
from vitcli.bench.timing import Contestant, Stats, run_rounds, time_steps
from vitcli.engine.runtime import pick_device
from vitcli.errors import VitError
from vitcli.models import resolve_config

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
OBJECTIVES = ("supervised", "mpp", "mae")
ROUNDS = 5


def defaults(device: torch.device, compile: bool) -> dict[str, int]:
    """Batch, timed steps and warm-up steps when not given."""
    if device.type == "cuda":
        return {"batch_size": 128, "steps": 50, "warmup": 10}
    return {"batch_size": 16, "steps": 10, "warmup": 3 if compile else 2}


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: auto is bf16 on CUDA, fp32 (none) on CPU."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if dtype not in DTYPES:
        raise VitError(f"--dtype must be fp32, bf16 or auto, got {dtype!r}.")
    return DTYPES[dtype]


def load_average() -> float | None:
    """The 1-minute load average (other work competing for the CPU), None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def bench_model(
    model: str,
    *,
    mode: str = "train",
    batch_size: int | None = None,
    img_size: tuple[int, int] | None = None,
    dtype: str = "auto",
    compile: bool = False,
    compare: str | None = None,
    device: str = "auto",
    steps: int | None = None,
    warmup: int | None = None,
    peak_tflops: float | None = None,
    objective: str = "supervised",
    say: Callable[[str], Any] = lambda message: None,
) -> dict[str, Any]:
    """Benchmark one model (and timm's equivalent with compare='timm'); a JSON-ready dict (see docs/benchmarks.md).
    `objective` mpp / mae times their training step on the same encoder."""
    if mode not in MODES:
        raise VitError(f"--mode must be train or infer, got {mode!r}.")
    if objective not in OBJECTIVES:
        raise VitError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}.")
    if objective != "supervised" and (mode != "train" or compare is not None):
        raise VitError(f"--objective {objective} times a training step of vitcli's encoder: use --mode train without --compare.")
    dev = pick_device(device)
    amp_dtype = resolve_dtype(dtype, dev)
    d = defaults(dev, compile)
    batch_size, steps, warmup = batch_size or d["batch_size"], steps or d["steps"], d["warmup"] if warmup is None else warmup
    if min(batch_size, steps) < 1 or warmup < 0:
        raise VitError("--batch-size and --steps must be >= 1, --warmup >= 0.")
    cfg = resolve_config(model, **({"img_size": img_size} if img_size else {}))
    load_before = load_average()

    contestants: list[tuple[ModelUnderTest, Contestant, dict[str, Any], memory.CudaPeak | None]] = []
    for label, name, module in build_models(cfg, compare=compare):
        mut = prepare(label, name, module, cfg, mode=mode, batch_size=batch_size, device=dev, amp_dtype=amp_dtype,
                      compile=compile, objective=objective)
        say(f"{label}: {name}, {mut.params / 1e6:.1f}M parameters; warming up ({warmup} steps{', compiling' if compile else ''})")
        facts: dict[str, Any] = {"name": name, "params": mut.params}
        t0 = time.perf_counter()
        first = time_steps(mut.step, min(1, warmup), dev)
        time_steps(mut.step, warmup - len(first), dev)
        facts["first_step_seconds"] = round(first[0] if first else 0.0, 4)
        facts["warmup_seconds"] = round(time.perf_counter() - t0, 3)
        facts["flops_per_step"], facts["flops_by_op"] = count_flops(mut.eager_step)
        hooks = memory.CudaPeak(dev, mut.resident_bytes) if dev.type == "cuda" else None
        contestant = Contestant(label, mut.step, **({"before_round": hooks.before_round, "after_round": hooks.after_round} if hooks else {}))
        contestants.append((mut, contestant, facts, hooks))

    probe = MatmulProbe.for_device(dev, amp_dtype or torch.float32)
    probe.step()  # warm-up
    probe_c = Contestant("matmul", probe.step, per_round=1)
    say(f"timing {steps} steps of {batch_size} images per model in {min(ROUNDS, steps)} interleaved rounds")
    run_rounds([c for _, c, _, _ in contestants] + [probe_c], steps=steps, rounds=ROUNDS, device=dev,
               on_round=lambda r, n: say(f"round {r}/{n} done"))

    if dev.type == "cpu":  # one more, untimed step per model under MemTracker, kept out of the rounds
        for mut, _, facts, _ in contestants:
            facts["peak_memory_bytes"] = memory.cpu_step_peak(mut)

    probe_stats = Stats.of(probe_c.times)
    matmul_flops = probe.flops / probe_stats.median
    name = device_name(dev)
    peak = peak_tflops * 1e12 if peak_tflops else (peak_flops(name, amp_dtype or torch.float32) if dev.type == "cuda" else None)
    result: dict[str, Any] = {
        "model": cfg.name,
        "mode": mode,
        "objective": objective,
        "device": dev.type,
        "device_name": name,
        "dtype": "bf16" if amp_dtype == torch.bfloat16 else "fp32",
        "batch_size": batch_size,
        "img_size": list(cfg.img_size),
        "compile": compile,
        "steps": steps,
        "warmup": warmup,
        "rounds": min(ROUNDS, steps),
        "threads": torch.get_num_threads(),
        "peak_flops_per_second": peak,
        "matmul": {"n": probe.n, "dtype": str(probe.dtype).removeprefix("torch."), "flops_per_second": matmul_flops,
                   "spread_pct": round(100 * probe_stats.iqr / probe_stats.median, 1)},
        "memory_method": memory.CPU_METHOD if dev.type == "cpu" else memory.CUDA_METHOD,
        "load_average": [load_before, load_average()],
    }
    for mut, c, facts, hooks in contestants:
        if hooks is not None:
            facts["peak_memory_bytes"] = hooks.peak
        s = Stats.of(c.times)
        flops_per_second = facts["flops_per_step"] / s.median
        result[mut.label] = {
            **facts,
            "images_per_second": batch_size / s.median,
            "step_ms_median": 1000 * s.median,
            "step_ms_iqr": 1000 * s.iqr,
            "step_ms_min": 1000 * s.min,
            "step_ms_max": 1000 * s.max,
            "flops_per_second": flops_per_second,
            "mfu": flops_per_second / peak if peak else None,
            "fraction_of_matmul": flops_per_second / matmul_flops,
        }
    result["timm"] = result.get("timm")
    result["ratio"] = (result["vitcli"]["images_per_second"] / result["timm"]["images_per_second"]) if result["timm"] else None
    return result
