#!/usr/bin/env bash
# Calibrate the streaming-head pattern of the default model (SmolLM2-135M-Instruct) and ship it.
#
#   scripts/calibrate_default_model.sh cpu   # the run that made the shipped pattern (2-core CPU)
#   scripts/calibrate_default_model.sh gpu   # the full run for a CUDA GPU (H200: a few minutes)
#
# Both use the sparse settings lserve evaluates the model with (sink 64, local 512). The output
# folder gets full_attention_heads.tsv, SmolLM2-135M-Instruct.json, config.json, log.tsv and gate
# checkpoints; with SHIP=1 the .json is copied to src/lserve/patterns/, where
# LLM(streaming_sparsity=...) finds it without attn_pattern.
set -euo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-cpu}"
OUT="${OUT:-runs/calibrate-SmolLM2-135M-Instruct-$MODE}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

case "$MODE" in
  cpu)  # what fitted in ~45 minutes on a shared 2-core CPU: short contexts, few steps
    ARGS=(--device cpu --steps 60 --context-lengths 1024:1536 --num-samples 12 --num-passkeys 4 --save-every 10) ;;
  gpu)  # DuoAttention-like: 50 lengths over most of the 8K context, 10 passkeys, 1000 steps
    ARGS=(--device cuda --steps 1000 --context-lengths 1024:8000 --num-samples 50 --num-passkeys 10 --save-every 100) ;;
  *) echo "usage: $0 cpu|gpu" >&2; exit 2 ;;
esac

"$PYTHON" -m lserve.cli calibrate --output "$OUT" --lr 0.02 --reg 0.05 --sink 64 --local 512 \
  --passkey-length 8 --seed 42 "${ARGS[@]}"

if [ "${SHIP:-0}" = 1 ]; then
  cp "$OUT/SmolLM2-135M-Instruct.json" src/lserve/patterns/SmolLM2-135M-Instruct.json
  echo "shipped: src/lserve/patterns/SmolLM2-135M-Instruct.json"
fi
