"""Markdown table rows from `vit bench --json` files, grouped by configuration (median over repeats).

    .venv/bin/python benchmarks/summarize.py runs/bench/cpu-*/*.json

Each configuration prints the median of its repeats and the range, so a noisy repeat is visible.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def key(r: dict) -> tuple:
    if "vitcli" not in r:
        d = r["data"]
        return ("data", d["dataset"], tuple(d["img_size"]), d["batch_size"], d["num_workers"], d["device"])
    return ("model", r["model"], r["mode"], tuple(r["img_size"]), r["batch_size"], r["dtype"], r["compile"], r["device"])


def spread(values: list[float], fmt: str) -> str:
    mid = statistics.median(values)
    if len(values) == 1:
        return format(mid, fmt)
    return f"{format(mid, fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def main(paths: list[str]) -> None:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in paths:
        text = Path(p).read_text().strip()
        if text:
            r = json.loads(text)
            groups[key(r)].append(r)
    model_rows, data_rows = [], []
    for k, runs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        loads = [x for r in runs for x in (r.get("load_average") or []) if x is not None]
        load = f"{min(loads):.2f}–{max(loads):.2f}" if loads else "-"
        if k[0] == "data":
            d0 = runs[0]["data"]
            ips = [r["data"]["images_per_second"] for r in runs]
            data_rows.append(f"| {d0['dataset']} | {d0['img_size'][0]} | {d0['batch_size']} | {d0['num_workers']} | "
                             f"{spread(ips, ',.0f')} | {len(runs)} |")
            continue
        r0 = runs[0]
        ours = [r["vitcli"]["images_per_second"] for r in runs]
        row = (f"| {r0['model']} | {r0['mode']} | {r0['img_size'][0]} | {r0['batch_size']} | {r0['dtype']}"
               f"{' compiled' if r0['compile'] else ''} | {spread(ours, ',.1f')} |")
        if r0.get("timm"):
            timm = [r["timm"]["images_per_second"] for r in runs]
            ratio = [r["ratio"] for r in runs]
            row += f" {spread(timm, ',.1f')} | {spread(ratio, '.3f')} |"
        else:
            row += " - | - |"
        frac = [r["vitcli"]["fraction_of_matmul"] * 100 for r in runs]
        iqr = [r["vitcli"]["step_ms_iqr"] / r["vitcli"]["step_ms_median"] * 100 for r in runs]
        mm = [r["matmul"]["flops_per_second"] / 1e9 for r in runs]
        mfu = [r["vitcli"]["mfu"] * 100 for r in runs if r["vitcli"].get("mfu") is not None]
        row += (f" {spread(frac, '.1f')}% | {spread(mm, '.0f')} | {spread(mfu, '.1f') + '%' if mfu else '-'} |"
                f" {statistics.median(iqr):.1f}% | {load} | {len(runs)} |")
        model_rows.append(row)
    if model_rows:
        print("| model | mode | res | batch | dtype | ours img/s | timm img/s | ours/timm | of matmul | matmul GFLOP/s | MFU | step IQR | load | runs |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        print("\n".join(model_rows))
    if data_rows:
        print("\n| data set | res | batch | workers | images/s | runs |")
        print("| --- | --- | --- | --- | --- | --- |")
        print("\n".join(data_rows))


if __name__ == "__main__":
    main(sys.argv[1:])
