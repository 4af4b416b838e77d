#!/usr/bin/env bash
# call 1: GGUF part 1; GPU tests of FP8 labels (bf16 kernels, GPU engine against CPU)
mkdir -p /tmp/m && cp .gpu/m.partaa /tmp/m/
set -u
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; date; git log --oneline -1 2>/dev/null
timeout 200 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_channel_scores.py tests/test_fp8_engine.py 2>&1 | tail -8 | tee $OUT/gpu_tests.txt
date
