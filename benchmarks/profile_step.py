"""Where the time of one step goes, ours against timm's: torch.profiler op totals side by side; or, given a
recipe, where the time of a whole training run goes (the loop around the step).

    .venv/bin/python benchmarks/profile_step.py vit_s16 --batch-size 8
    .venv/bin/python benchmarks/profile_step.py vit_pico --batch-size 64 --steps 20 --mode infer
    .venv/bin/python benchmarks/profile_step.py recipes/quickstart.yaml --set data.cache=decoded
    .venv/bin/python benchmarks/profile_step.py recipes/quickstart.yaml --digits-folder runs/bench/digits28

A recipe runs `vit pretrain` in this process with timers around the loop's parts (benchmarks/loop_timers.py):
setup (data, model, cache decode), batches (loader, augmentation, transfer), forward (with the loss and the
step's own Python), backward, optimizer, evaluation, checkpoints, logging, and what is left; the table gives
each in seconds and as a share of the wall time, and the images/s of the step alone against the whole run.
`--digits-folder DIR` first writes the issue's 28x28 folder (4,000 grey digit PNGs) and trains on it.

Both models are built exactly as `vit bench --compare timm` builds them (same weights, same optimizer),
warmed up, then profiled for --steps steps each (alternately, so load drift hits both). The table lists
the aten ops by self time with their call counts: equal counts mean the two run the same kernels, and
any gap is in the kernels' time, not in extra work.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from vitcli.bench.steps import build_models, prepare
from vitcli.models import resolve_config


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1].endswith((".yaml", ".yml")):
        from loop_timers import main as profile_loop

        return profile_loop(sys.argv[1:])
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
