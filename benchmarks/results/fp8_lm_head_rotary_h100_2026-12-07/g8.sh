#!/usr/bin/env bash
# where a 128K prefill chunk's time goes: dense bf16 vs static+dynamic with FP8 KV + FP8 weights (steps 8-9 of 16)
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; date
S2="streaming_sparsity=0.5,attn_pattern=random,prefill_sink_tokens=128,prefill_local_tokens=8192,decode_sink_tokens=128,decode_local_tokens=256"
W8="$S2,token_budget=4096,selector_interval=4,kv_cache_dtype=fp8,quantization=fp8"
timeout 280 python3 benchmarks/decode_profile.py --phase prefill --skip 8 --steps 2 --top 30 -- \
  --dummy-config llama-3-8b-262k --input-len 128k --output-len 20 --batch-size 1 --num-warmups 0 \
  --compare dense: --compare "sd-kv8-w8:$W8" 2>&1 | grep -v "it/s\|s/it\|USDT" | tee $OUT/prefill_profile_128k.txt | tail -75
date
