#!/usr/bin/env bash
# FP8 products with fast accumulation: the FP8 weight tests, then the 128K bench (dense vs FP8 sparse)
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; date
timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_weights.py 2>&1 | tail -3 | tee $OUT/gpu_tests.txt
S2="streaming_sparsity=0.5,attn_pattern=random,prefill_sink_tokens=128,prefill_local_tokens=8192,decode_sink_tokens=128,decode_local_tokens=256"
W8="$S2,token_budget=4096,selector_interval=4,kv_cache_dtype=fp8,quantization=fp8"
timeout 200 python3 -m lserve.cli bench --dummy-config llama-3-8b-262k --input-len 128k --output-len 32 --batch-size 1 \
  --num-warmups 0 --output-json $OUT/bench_128k.json --compare dense: --compare "sd-kv8-w8:$W8" \
  2>&1 | grep -v "it/s\|s/it\|USDT" | tee $OUT/bench_128k.txt | tail -4
date
