#!/usr/bin/env bash
# The GPU targets of the performance issue (not yet run: no CUDA machine so far; see docs/benchmarks.md).
#
#   benchmarks/gpu_targets.sh          # JSON under runs/bench/gpu-<time>/
#
# Targets: ViT-B/16 at 224, bf16 training >= 1.15x timm eager (AMP) with MFU >= 45%; inference >= timm
# compiled; the input pipeline must outrun the training step. MFU uses the datasheet peak of the card
# (vitcli.bench.hardware.GPU_PEAKS; --peak-tflops for one not listed).
set -euo pipefail
cd "$(dirname "$0")/.."

VIT=${VIT:-.venv/bin/vit}
OUT=${OUT:-runs/bench/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv > "$OUT/nvidia-smi.csv" || true

run() {
  local name=$1; shift
  echo "== $name: vit bench $*" >&2
  "$VIT" bench "$@" --json > "$OUT/$name.json"
}

run b16-train-bf16          vit_b16 --mode train --batch-size 128 --dtype bf16 --compare timm
run b16-train-bf16-compile  vit_b16 --mode train --batch-size 128 --dtype bf16 --compare timm --compile
run b16-infer-bf16          vit_b16 --mode infer --batch-size 256 --dtype bf16 --compare timm
run b16-infer-bf16-compile  vit_b16 --mode infer --batch-size 256 --dtype bf16 --compare timm --compile
# Loader vs model on ImageNet-like JPEGs (~500x375): the tensor pipeline decodes them on the GPU (nvJPEG)
# after the workers planned the crops; the PIL pipeline decodes and augments in the workers.
JPEGS=${JPEGS:-runs/bench/jpegs}
[ -d "$JPEGS" ] || .venv/bin/python benchmarks/jpeg_folder.py "$JPEGS" --images 4000
run jpeg-tensor-w8          vit_b16 --data "$JPEGS" --batch-size 128 --num-workers 8 --pipeline tensor
run jpeg-pil-w8             vit_b16 --data "$JPEGS" --batch-size 128 --num-workers 8 --pipeline pil
run jpeg-tensor-w2          --data "$JPEGS" --res 224 --batch-size 128 --num-workers 2 --pipeline tensor
# End to end: a short ViT-B/16 run through the trainer on those JPEGs (tensor pipeline: nvJPEG decode and
# crops on the GPU, bf16 autocast, fused AdamW); metrics.jsonl's train lines give the loop's images/s.
echo "== pretrain smoke run: $OUT/pretrain" >&2
"$VIT" pretrain recipes/vit_b16.yaml --out "$OUT/pretrain" --force \
  --set data.dataset="$JPEGS" --set data.num_workers=8 --set train.epochs=3 --set train.batch_size=256 \
  --set train.micro_batch_size=128 --set schedule.warmup_steps=10 --set train.log_every=5 --set train.eval_every=20 \
  > "$OUT/pretrain.log" 2>&1
echo "results in $OUT" >&2
