#!/usr/bin/env bash
source .gpu/common.sh
S2="streaming_sparsity=0.5,attn_pattern=random,prefill_sink_tokens=128,prefill_local_tokens=8192,decode_sink_tokens=128,decode_local_tokens=256"
W8="$S2,token_budget=4096,selector_interval=4,kv_cache_dtype=fp8,quantization=fp8"
timeout 230 python3 .gpu/pfx.py bench --dummy-config llama-3-8b-262k --input-len 256k --output-len 32 --batch-size 1 \
  --num-warmups 0 --output-json $OUT/bench_256k_bn8.json --compare dense: --compare "sd-kv8-w8:$W8" \
  --compare "sd-kv8-w8-bn8:$W8" --compare "sd-kv8-w8-bn8-pf1024:$W8" \
  2>&1 | grep -v "it/s\|s/it\|USDT" | tee $OUT/bench_256k_bn8.txt | tail -8
date
R=(--task ruler --subtasks niah_multikey,niah_multivalue,niah_multiquery --lengths 2k,4k,6k --num-samples 80)
EV 200 "${R[@]}" --output-dir $OUT/dense-f32 --compare "dense-f32:dtype=float32" > $OUT/ruler80_dense-f32.txt
grep "average\|time" $OUT/ruler80_dense-f32.txt; date
