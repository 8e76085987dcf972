#!/usr/bin/env bash
# The CPU targets of the performance issue, as `vit bench` runs (docs/benchmarks.md has the latest figures).
#
#   benchmarks/cpu_targets.sh                 # all of them, 3 repeats each, JSON under runs/bench/ (git-ignored)
#   REPEAT=1 ONLY=pico benchmarks/cpu_targets.sh
#
# Every run is one JSON file (`vit bench --json`, which records the load average before and after).
# On a shared machine the script first waits (up to WAIT_MAX seconds) until the cores are idle (less than
# QUIET % busy over 5 s), so figures are not taken while other jobs use them. Summarise with
#   .venv/bin/python benchmarks/summarize.py runs/bench/cpu-*/*.json
set -euo pipefail
cd "$(dirname "$0")/.."

VIT=${VIT:-.venv/bin/vit}
REPEAT=${REPEAT:-3}
QUIET=${QUIET:-10}
WAIT_MAX=${WAIT_MAX:-600}
ONLY=${ONLY:-all}
OUT=${OUT:-runs/bench/cpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"

busy_pct() {  # CPU busy % over the next 5 s, from /proc/stat (user+nice+system+irq+softirq+steal)
  local a b
  a=($(head -1 /proc/stat)); sleep 5; b=($(head -1 /proc/stat))
  local busy=$(( (b[1]+b[2]+b[3]+b[6]+b[7]+b[8]) - (a[1]+a[2]+a[3]+a[6]+a[7]+a[8]) ))
  local total=$(( busy + (b[4]+b[5]) - (a[4]+a[5]) ))
  echo $(( total > 0 ? 100 * busy / total : 0 ))
}

wait_quiet() {  # until the cores are idle (< QUIET % busy over 5 s), at most WAIT_MAX seconds
  local waited=0
  while [ "$(busy_pct)" -ge "$QUIET" ] && [ "$waited" -lt "$WAIT_MAX" ]; do
    waited=$((waited + 5))
  done
}

run() {  # run NAME ARGS...: one `vit bench --json` per repeat
  local name=$1; shift
  [ "$ONLY" = all ] || case "$name" in *"$ONLY"*) ;; *) return 0 ;; esac  # ONLY=pico: the runs whose name has it
  for i in $(seq 1 "$REPEAT"); do
    wait_quiet
    echo "== $name #$i (load $(cut -d' ' -f1 /proc/loadavg)): vit bench $*" >&2
    "$VIT" bench "$@" --json > "$OUT/$name-$i.json"
  done
}

# ViT-S/16 at 224, training (forward + backward + AdamW), fp32, against timm eager, interleaved.
run s16-train-b16   vit_s16 --mode train --batch-size 16 --steps 6 --compare timm
run s16-train-b32   vit_s16 --mode train --batch-size 32 --steps 4 --compare timm
# The quickstart model at its recipe's batch.
run pico-train-b64  vit_pico --mode train --batch-size 64 --steps 60 --compare timm
# torch.compile must never be slower than eager: compare each compiled figure with the eager one above.
run pico-train-b64-compile vit_pico --mode train --batch-size 64 --steps 60 --compare timm --compile
run s16-train-b16-compile  vit_s16 --mode train --batch-size 16 --steps 6 --compare timm --compile
# Inference.
run s16-infer-b32   vit_s16 --mode infer --batch-size 32 --steps 10 --compare timm
# The input pipeline of the quickstart (main process, as its recipe) and with 2 workers.
run digits-data-w0  --data digits --res 8 --batch-size 64 --num-workers 0 --steps 60
run digits-data-w2  --data digits --res 8 --batch-size 64 --num-workers 2 --steps 60
# Today's families against timm's own definitions (ONLY=fam for these alone), at 224.
run fam-deit-distilled-infer deit_s16_distilled --mode infer --batch-size 8 --steps 3 --compare timm
run fam-deit3-infer          deit3_s16 --mode infer --batch-size 8 --steps 3 --compare timm
run fam-dinov2-reg4-infer    vit_s14_dinov2_reg4 --res 224 --mode infer --batch-size 8 --steps 3 --compare timm
run fam-siglip-infer         vit_b16_siglip --mode infer --batch-size 8 --steps 3 --compare timm
run fam-clip-infer           vit_b32_clip_quickgelu --mode infer --batch-size 8 --steps 3 --compare timm
run fam-eva02-infer          eva02_s14 --mode infer --batch-size 8 --steps 3 --compare timm
run fam-dinov3-infer         vit_s16_dinov3 --res 224 --mode infer --batch-size 8 --steps 3 --compare timm
run fam-dinov2-reg4-train    vit_s14_dinov2_reg4 --res 224 --mode train --batch-size 8 --steps 2 --compare timm
run fam-eva02-train          eva02_s14 --mode train --batch-size 8 --steps 2 --compare timm
run fam-dinov3-train         vit_s16_dinov3 --res 224 --mode train --batch-size 8 --steps 2 --compare timm
echo "results in $OUT" >&2
