"""Print `vit bench` results as rich tables (the `--json` output is the result dict itself)."""

from __future__ import annotations

import os
from typing import Any

from rich.console import Console
from rich.table import Table


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for factor, prefix in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.2f} {prefix}{unit}"
    return f"{x:.2f} {unit}".rstrip()


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def print_model(result: dict[str, Any], console: Console) -> None:
    r = result
    h, w = r["img_size"]
    title = (f"vit bench {r['model']}: {r['mode']}, batch {r['batch_size']}, {h}x{w}, {r['dtype']}"
             f"{', compiled' if r['compile'] else ''} on {r['device_name']}")
    table = Table(title=title)
    sides = [k for k in ("vitcli", "timm") if r.get(k)]
    table.add_column("")
    for k in sides:
        table.add_column(k if r[k]["name"].startswith("timm") else f"{k}\n{r[k]['name']}", justify="right")
    if r.get("timm"):
        table.add_column("ours / timm", justify="right")

    def row(label: str, key: str, fmt, ratio: bool = False) -> None:
        cells = [fmt(r[k][key]) for k in sides]
        if r.get("timm"):
            a, b = r["vitcli"][key], r["timm"][key]
            cells.append(f"{a / b:.3f}" if ratio and a is not None and b else "")
        table.add_row(label, *cells)

    row("images/s", "images_per_second", lambda v: f"{v:,.1f}", ratio=True)
    row("step time, median", "step_ms_median", lambda v: f"{v:,.1f} ms", ratio=True)
    row("step time, spread (IQR)", "step_ms_iqr", lambda v: f"{v:,.1f} ms")
    row("peak memory", "peak_memory_bytes", _bytes, ratio=True)
    row("FLOPs per step", "flops_per_step", lambda v: _si(v, "FLOP"))
    row("model FLOP/s", "flops_per_second", lambda v: _si(v, "FLOP/s"), ratio=True)
    if r["device"] == "cuda":
        row("MFU", "mfu", _pct)
    row(f"of measured {r['matmul']['dtype']} matmul", "fraction_of_matmul", _pct)
    row("parameters", "params", lambda v: f"{v / 1e6:.2f}M")
    row("first step (warm-up)", "first_step_seconds", lambda v: f"{v:.2f} s")
    console.print(table)
    m = r["matmul"]
    peak = f"; datasheet peak {_si(r['peak_flops_per_second'], 'FLOP/s')}" if r.get("peak_flops_per_second") else ""
    console.print(f"matmul probe ({m['n']}x{m['n']} {m['dtype']}): {_si(m['flops_per_second'], 'FLOP/s')} "
                  f"(spread {m['spread_pct']}%){peak}. {r['steps']} timed steps after {r['warmup']} warm-up, "
                  f"{r['rounds']} interleaved rounds; {r['threads']} threads.", highlight=False)
    console.print(f"peak memory: {r['memory_method']}.", style="dim", highlight=False)
    before, after = r.get("load_average") or (None, None)
    if before is not None:
        cores = os.cpu_count() or 1
        # `after` includes the bench's own threads; only `before` says whether other work was running.
        busy = "; other work was running when it started: expect noisy times" if before >= 0.5 * cores else ""
        console.print(f"1-minute load average {before:.2f} before, {after:.2f} after on {cores} cores{busy}.",
                      style="dim", highlight=False)
    if r.get("ratio") is not None:
        console.print(f"ours / timm: {r['ratio']:.3f}x images/s", highlight=False)


def print_data(result: dict[str, Any], console: Console) -> None:
    d = result
    h, w = d["img_size"]
    console.print(
        f"input pipeline {d['dataset']} ({d['split']}, {d['num_images']} images) at {h}x{w}, batch {d['batch_size']}, "
        f"{d['num_workers']} workers, {d['device']}: {d['images_per_second']:,.1f} images/s "
        f"(median batch {d['batch_ms_median']:.1f} ms, spread {d['batch_ms_iqr']:.1f} ms; first batch {d['first_batch_seconds']:.2f} s)",
        highlight=False)
    where = (" (JPEGs decoded on the device)" if d.get("decode_on_device")
             else " (large JPEGs decoded at reduced size where the crop allows)" if d.get("reduced_decode") else "")
    console.print(f"{d['pipeline']} pipeline{where}: {d['transforms']}", style="dim", highlight=False)
    if d.get("cache") not in (None, "none"):
        console.print(f"data.cache {d['cache']}: the decoding pass before the first batch took {d['cache_seconds']:.1f} s",
                      style="dim", highlight=False)


def print_bench(result: dict[str, Any], console: Console) -> None:
    """The whole report: the model table, the input-pipeline line, and which of the two bounds training."""
    if result.get("vitcli"):
        print_model(result, console)
    if result.get("data"):
        print_data(result["data"], console)
    if result.get("bottleneck"):
        console.print(result["bottleneck_note"], highlight=False)
