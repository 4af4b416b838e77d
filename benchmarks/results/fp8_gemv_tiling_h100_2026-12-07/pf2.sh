#!/usr/bin/env bash
# one call: GEMV L2 prefetch micro + 256K bench (dense, FP8 sparse, with prefetch) + kernel profile of the FP8 step
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; date
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_gemv.py 2>&1 | tail -3 | tee $OUT/gemv_tests.txt
(cd benchmarks && timeout 120 python3 gemv_decode.py --fp8 --prefetch 0,1024,2048,4096,16384) 2>&1 | tee $OUT/gemv_prefetch.txt
(cd benchmarks && timeout 60 python3 gemv_decode.py --shapes lm_head --rows 1) 2>&1 | tee $OUT/gemv_lm_head.txt
date
S="streaming_sparsity=0.5,attn_pattern=random,prefill_sink_tokens=128,prefill_local_tokens=8192,decode_sink_tokens=128,decode_local_tokens=256"
W8="$S,token_budget=4096,selector_interval=4,kv_cache_dtype=fp8,quantization=fp8"
timeout 280 python3 .gpu/pfx.py bench --dummy-config llama-3-8b-262k --input-len 256k --output-len 32 --batch-size 1 \
  --num-warmups 0 --output-json $OUT/bench_256k.json --compare dense: --compare "sd-kv8-w8:$W8" \
  --compare "sd-kv8-w8-pf1024:$W8" --compare "sd-kv8-w8-pf4096:$W8" \
  2>&1 | grep -v "it/s\|s/it\|USDT" | tee $OUT/bench_256k.txt | tail -25
date
timeout 150 python3 .gpu/pfx.py --profile --steps 16 --top 40 -- --dummy-config llama-3-8b-262k \
  --input-len 256k --output-len 32 --batch-size 1 --num-warmups 0 --compare "sd-kv8-w8:$W8" \
  2>&1 | grep -v "it/s\|s/it\|USDT" | tee $OUT/decode_profile_256k.txt | tail -60
date
