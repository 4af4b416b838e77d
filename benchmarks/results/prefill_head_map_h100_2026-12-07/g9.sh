#!/usr/bin/env bash
# next: GPU tests of the prefill head map (TMA path included), then the 128K bench (dense vs FP8 sparse) and the
# prefill profile of the FP8 sparse chunk without the head copies
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; date
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_ring_and_selection.py \
  tests/test_fp8_weights.py tests/test_gpu_engine.py 2>&1 | tail -5 | tee $OUT/gpu_tests.txt
S2="streaming_sparsity=0.5,attn_pattern=random,prefill_sink_tokens=128,prefill_local_tokens=8192,decode_sink_tokens=128,decode_local_tokens=256"
W8="$S2,token_budget=4096,selector_interval=4,kv_cache_dtype=fp8,quantization=fp8"
timeout 160 python3 -m lserve.cli bench --dummy-config llama-3-8b-262k --input-len 128k --output-len 32 --batch-size 1 \
  --num-warmups 0 --output-json $OUT/bench_128k.json --compare dense: --compare "sd-kv8-w8:$W8" \
  2>&1 | grep -v "it/s\|s/it\|USDT" | tee $OUT/bench_128k.txt | tail -4
date
timeout 120 python3 benchmarks/decode_profile.py --phase prefill --skip 8 --steps 2 --top 30 -- \
  --dummy-config llama-3-8b-262k --input-len 128k --output-len 20 --batch-size 1 --num-warmups 0 \
  --compare "sd-kv8-w8:$W8" 2>&1 | grep -v "it/s\|s/it\|USDT" | tee $OUT/prefill_profile_128k.txt | tail -25
date
# probe: FP8 Q.K^T (and P.V) in a simple causal FA2 kernel vs bf16 (carry .gpu/fp8qk.py too)
timeout 100 python3 .gpu/fp8qk.py --n 32768 2>&1 | tee $OUT/fp8qk_probe.txt | tail -20
date
