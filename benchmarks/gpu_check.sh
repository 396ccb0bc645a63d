#!/usr/bin/env bash
# GPU check: the training and scoring benchmarks at the paper size (256 px, width 1, batch 8) with bf16 autocast
# and channels-last, eager and with torch.compile (TrustMAE), plus TrustMAE at batch 64; then a summary with the
# model FLOP utilisation against the GPU's dense bf16 peak (data sheet) and against a bf16 matmul measured in the
# same process. Needs < 8 minutes including installs: every stage has its own time limit (install 120 s, then
# 75 + 45 + 150 + 60 s), and a stage that fails or runs out of time is reported and skipped.
#
#   benchmarks/gpu_check.sh                      # on a CUDA machine; results in results/bench/gpu/
#   benchmarks/gpu_check.sh --device cpu --out /tmp/gpu_dry    # dry run on the CPU with tiny sizes
#
# Environment: PYTHON (default .venv/bin/python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
OUT=results/bench/gpu
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (use --device cuda|cpu, --out DIR)" >&2; exit 2 ;;
  esac
done

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi

# 1. Install only what is missing (the library from this checkout, with its dependencies).
if ! "$PY" -c "import torch, torchvision, sklearn, skimage, yaml, tqdm, trustmae_lib" 2>/dev/null; then
  echo "== installing trustmae_lib and its dependencies into $PY"
  timeout 120 "$PY" -m pip install -q -e . || { echo "gpu_check.sh: install failed" >&2; exit 1; }
fi
if [[ "$DEVICE" == cuda ]] && ! "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: no CUDA device visible to $PY; use --device cpu for a dry run" >&2
  exit 1
fi

if [[ "$DEVICE" == cuda ]]; then
  SIZES=(--profiles paper)
  TRAIN=(--repeats-paper 20 --repeats 20 --warmup 5)
  SCORE=(--images 64 --batch-size 32 --repeats 5 --warmup 2)
  COMMON=(--wait-idle 0)
  TRAIN_METHODS=(--methods trustmae memae ae_l2 ae_ssim)
  SCORE_METHODS=(--methods trustmae memae ae_l2 ae_ssim)
  BIG_BATCH=64
  COMPILE=1
else  # dry run: tiny sizes, one repeat, one thread, no compile
  SIZES=(--profiles smoke)
  TRAIN=(--repeats-paper 1 --repeats 1 --warmup 0)
  SCORE=(--images 2 --repeats 1 --warmup 0)
  COMMON=(--threads 1 --matmul-size 256 --wait-idle 0)
  TRAIN_METHODS=(--methods trustmae memae)
  SCORE_METHODS=(--methods trustmae)
  BIG_BATCH=8
  COMPILE=0
fi
mkdir -p "$OUT"
FAILED=0
stage() {  # stage <seconds> <name> <command...>
  local limit="$1" name="$2"; shift 2
  echo "== $name (limit ${limit} s)"
  if ! timeout "$limit" "$@"; then echo "gpu_check.sh: stage '$name' failed or ran out of time" >&2; FAILED=1; fi
}

FAST=(--device "$DEVICE" --amp bf16 --layouts channels_last "${COMMON[@]}")
stage 75 "train, bf16 + channels-last, eager" \
  "$PY" benchmarks/bench_train.py "${FAST[@]}" "${SIZES[@]}" "${TRAIN[@]}" "${TRAIN_METHODS[@]}" \
  --out "$OUT/train_bf16_cl.json"
stage 45 "train TrustMAE, batch $BIG_BATCH" \
  "$PY" benchmarks/bench_train.py "${FAST[@]}" "${SIZES[@]}" "${TRAIN[@]}" --methods trustmae \
  --batch-size "$BIG_BATCH" --out "$OUT/train_bf16_cl_b${BIG_BATCH}.json"
if [[ "$COMPILE" == 1 ]]; then
  stage 150 "train TrustMAE, bf16 + channels-last + torch.compile" \
    "$PY" benchmarks/bench_train.py "${FAST[@]}" "${SIZES[@]}" "${TRAIN[@]}" --methods trustmae --compile \
    --out "$OUT/train_bf16_cl_compile.json"
fi
stage 60 "score, bf16 + channels-last" \
  "$PY" benchmarks/bench_score.py "${FAST[@]}" "${SIZES[@]}" "${SCORE[@]}" "${SCORE_METHODS[@]}" \
  --out "$OUT/score_bf16_cl.json"

"$PY" benchmarks/report.py "$OUT" --expect train score
exit "$FAILED"
