#!/usr/bin/env bash
# next: GPU tests of the changed kernels (rotary blocks, GEMV prefetch/defaults, LM head GEMV), then the 256K bench
# with the new defaults (dense vs FP8 sparse) and a kernel profile of the FP8 step
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; date
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fused_layers.py tests/test_gemv.py tests/test_fp8_weights.py \
  tests/test_fp8_engine.py 2>&1 | tail -5 | tee $OUT/gpu_tests.txt
S2="streaming_sparsity=0.5,attn_pattern=random,prefill_sink_tokens=128,prefill_local_tokens=8192,decode_sink_tokens=128,decode_local_tokens=256"
W8="$S2,token_budget=4096,selector_interval=4,kv_cache_dtype=fp8,quantization=fp8"
timeout 200 python3 -m lserve.cli bench --dummy-config llama-3-8b-262k --input-len 256k --output-len 32 --batch-size 1 \
  --num-warmups 0 --output-json $OUT/bench_256k.json --compare dense: --compare "sd-kv8-w8:$W8" \
  2>&1 | grep -v "it/s\|s/it\|USDT" | tee $OUT/bench_256k.txt | tail -6
date
timeout 120 python3 benchmarks/decode_profile.py --steps 16 --top 40 -- --dummy-config llama-3-8b-262k \
  --input-len 256k --output-len 32 --batch-size 1 --num-warmups 0 --compare "sd-kv8-w8:$W8" \
  2>&1 | grep -v "it/s\|s/it\|USDT" | tee $OUT/decode_profile_256k.txt | tail -40
date
