"""`vit bench MODEL`: images/s, step time, peak memory and FLOP/s of a training or inference step.

    result = bench_model(BenchSpec("vit_s16", mode="train", batch_size=16, compare="timm"))
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
from vitcli.bench.spec import BenchSpec
from vitcli.bench.steps import ModelUnderTest, build_models, prepare
from vitcli.bench.timing import Contestant, Stats, run_rounds, time_steps
from vitcli.engine.runtime import pick_device
from vitcli.models import resolve_config

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
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
    return DTYPES[dtype]  # BenchSpec checked the name


def load_average() -> float | None:
    """The 1-minute load average (other work competing for the CPU), None where the OS has none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


Entry = tuple[ModelUnderTest, Contestant, dict[str, Any], "memory.CudaPeak | None"]


def bench_model(spec: BenchSpec, say: Callable[[str], Any] = lambda message: None) -> dict[str, Any]:
    """Benchmark spec.model (and timm's equivalent with compare='timm'); a JSON-ready dict (see
    docs/benchmarks.md). Objective mpp / mae times their training step on the same encoder."""
    dev = pick_device(spec.device)
    amp_dtype = resolve_dtype(spec.dtype, dev)
    d = defaults(dev, spec.compile)
    batch_size, steps = spec.batch_size or d["batch_size"], spec.steps or d["steps"]
    warmup = d["warmup"] if spec.warmup is None else spec.warmup
    cfg = resolve_config(spec.model, **({"img_size": spec.img_size} if spec.img_size else {}))
    load_before = load_average()
    contestants = [_warmed_up(spec, label, name, module, cfg, batch_size, warmup, dev, amp_dtype, say)
                   for label, name, module in build_models(cfg, compare=spec.compare)]

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
    peak = spec.peak_tflops * 1e12 if spec.peak_tflops else (
        peak_flops(name, amp_dtype or torch.float32) if dev.type == "cuda" else None)
    result: dict[str, Any] = {
        "model": cfg.name,
        "mode": spec.mode,
        "objective": spec.objective,
        "device": dev.type,
        "device_name": name,
        "dtype": "bf16" if amp_dtype == torch.bfloat16 else "fp32",
        "batch_size": batch_size,
        "img_size": list(cfg.img_size),
        "compile": spec.compile,
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
        result[mut.label] = _figures(c, facts, hooks, batch_size, peak, matmul_flops)
    result["timm"] = result.get("timm")
    result["ratio"] = (result["vitcli"]["images_per_second"] / result["timm"]["images_per_second"]) if result["timm"] else None
    return result


def _warmed_up(spec: BenchSpec, label: str, name: str, module, cfg, batch_size: int, warmup: int, dev: torch.device,
               amp_dtype, say) -> Entry:
    """One model's step, warmed up (compiled, when asked), with its FLOPs counted and its memory hooks."""
    mut = prepare(label, name, module, cfg, mode=spec.mode, batch_size=batch_size, device=dev, amp_dtype=amp_dtype,
                  compile=spec.compile, objective=spec.objective)
    say(f"{label}: {name}, {mut.params / 1e6:.1f}M parameters; warming up ({warmup} steps{', compiling' if spec.compile else ''})")
    facts: dict[str, Any] = {"name": name, "params": mut.params}
    t0 = time.perf_counter()
    first = time_steps(mut.step, min(1, warmup), dev)
    time_steps(mut.step, warmup - len(first), dev)
    facts["first_step_seconds"] = round(first[0] if first else 0.0, 4)
    facts["warmup_seconds"] = round(time.perf_counter() - t0, 3)
    facts["flops_per_step"], facts["flops_by_op"] = count_flops(mut.eager_step)
    hooks = memory.CudaPeak(dev, mut.resident_bytes) if dev.type == "cuda" else None
    contestant = Contestant(label, mut.step, **({"before_round": hooks.before_round, "after_round": hooks.after_round} if hooks else {}))
    return mut, contestant, facts, hooks


def _figures(c: Contestant, facts: dict[str, Any], hooks, batch_size: int, peak: float | None,
             matmul_flops: float) -> dict[str, Any]:
    if hooks is not None:
        facts["peak_memory_bytes"] = hooks.peak
    s = Stats.of(c.times)
    flops_per_second = facts["flops_per_step"] / s.median
    return {
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
