#!/usr/bin/env bash
# The GPU check: one script, ≤ 8 minutes on one H100/H200. Prints
#   1. the gpu-marked tests;
#   2. step ratios (attack step / one forward+backward) of MobileNetV2 and ResNet-50 (random weights cost what
#      trained ones do) in fp32 / bf16 / channels-last / compiled, and throughput against batch size;
#   3. the paper's full ResNet-50 CAM-ADV² schedule (400 + 1200 steps) on 100 images (goal ≤ 20 s);
#   4. a small --device cuda --batch-size auto audit whose verdicts must equal the CPU run's.
# Records go to benchmarks/results/gpu_check_*.json.
#   bash benchmarks/gpu_check.sh          # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry    # the same steps, tiny, on the CPU (CI runs this so it cannot rot)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
if [ "${1:-}" = "--dry" ]; then
  DRY=1; DEV=cpu; OUT="${OUT:-$(mktemp -d)}"
  MODELS="fmnist_resnet"; BATCH=4; BATCHES=4; K=1,2; PREC=fp32; EXTRA="--channels-last"; ATTACKS=pgd,cam
else
  DRY=0; DEV=cuda; OUT="${OUT:-benchmarks/results}"
  MODELS="mobilenet_v2 torchvision:resnet50"; BATCH=64; BATCHES=16,64,256; K=5,15; PREC=fp32,bf16
  EXTRA="--channels-last --compile"; ATTACKS=pgd,cam,grad,gradcam
fi
step() { printf '\n=== %s (%s)\n' "$*" "$(date +%T)"; }

step "gpu-marked tests"
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/ || { [ $? -eq 5 ] && echo "no gpu-marked test collected"; }

for m in $MODELS; do
  name="${m#torchvision:}"
  weights=(); [[ "$m" == torchvision:* ]] && weights=(--weights random)
  step "step ratios: $m"
  "$PY" benchmarks/step_cost.py --model "$m" "${weights[@]}" --device "$DEV" --batch "$BATCH" --batches "$BATCHES" \
    --k "$K" --precision "$PREC" --interpreters "$ATTACKS" --detectors squeeze-torch --blackbox cam \
    --json "$OUT/gpu_check_step_cost_${name}.json"
  [ "$DRY" = 1 ] || "$PY" benchmarks/step_cost.py --model "$m" "${weights[@]}" --device "$DEV" --batch "$BATCH" \
    --batches "$BATCH" --k "$K" --interpreters pgd,cam $EXTRA --json "$OUT/gpu_check_step_cost_${name}_cl_compile.json"
done

step "paper's CAM-ADV² schedule, and the audit on $DEV against the CPU"
"$PY" benchmarks/gpu_check.py --device "$DEV" $([ "$DRY" = 1 ] && echo --dry) --work "$OUT/gpu_check_runs" \
  --json "$OUT/gpu_check_$([ "$DRY" = 1 ] && echo dry || echo cuda).json"
step "done"
