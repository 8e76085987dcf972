"""Where the time of one step goes, ours against timm's: torch.profiler op totals side by side.

    .venv/bin/python benchmarks/profile_step.py vit_s16 --batch-size 8
    .venv/bin/python benchmarks/profile_step.py vit_pico --batch-size 64 --steps 20 --mode infer

Both models are built exactly as `vit bench --compare timm` builds them (same weights, same optimizer),
warmed up, then profiled for --steps steps each (alternately, so load drift hits both). The table lists
the aten ops by self time with their call counts: equal counts mean the two run the same kernels, and
any gap is in the kernels' time, not in extra work.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from vitcli.bench.steps import build_models, prepare
from vitcli.models import resolve_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--mode", default="train", choices=("train", "infer"))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()

    cpu = torch.device("cpu")
    cfg = resolve_config(args.model)
    muts = [prepare(label, name, module, cfg, mode=args.mode, batch_size=args.batch_size, device=cpu, amp_dtype=None,
                    compile=False) for label, name, module in build_models(cfg, compare="timm")]
    for m in muts:
        m.step(), m.step()
    totals: dict[str, dict[str, list[float]]] = {m.label: defaultdict(lambda: [0.0, 0]) for m in muts}
    phases: dict[str, dict[str, float]] = {m.label: defaultdict(float) for m in muts}
    for _ in range(args.steps):
        for m in muts:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                with record_function("step"):
                    m.step()
            for e in prof.key_averages():
                if e.key == "step":
                    phases[m.label]["step"] += e.cpu_time_total / 1e3
                elif e.key.startswith("aten::"):
                    totals[m.label][e.key][0] += e.self_cpu_time_total / 1e3
                    totals[m.label][e.key][1] += e.count
    ours, theirs = (totals[m.label] for m in muts)
    n = args.steps
    print(f"{args.model} {args.mode}, batch {args.batch_size}: step {phases['vitcli']['step'] / n:.1f} ms (ours) vs "
          f"{phases['timm']['step'] / n:.1f} ms (timm), profiler overhead included, mean of {n}")
    print(f"{'op':50s} {'ours ms':>10s} {'timm ms':>10s} {'ours calls':>11s} {'timm calls':>11s}")
    for op in sorted(set(ours) | set(theirs), key=lambda o: -ours.get(o, [0, 0])[0])[: args.rows]:
        a, b = ours.get(op, [0.0, 0]), theirs.get(op, [0.0, 0])
        print(f"{op:50s} {a[0] / n:10.2f} {b[0] / n:10.2f} {a[1] // n:11d} {b[1] // n:11d}")


if __name__ == "__main__":
    main()
