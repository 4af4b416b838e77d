#!/usr/bin/env bash
# passkey 4K-7K, 20 samples: both sparsities + FP8 KV, with and without key smoothing
source .gpu/common.sh
for c in "sd-fp8:$S,token_budget=512,kv_cache_dtype=fp8" "sd-fp8-nosmooth:$S,token_budget=512,kv_cache_dtype=fp8,kv_key_smoothing=false"; do
  n=${c%%:*}
  EV 140 --task passkey --lengths 4k,5k,6k,7k --num-samples 20 --output-dir $OUT/$n --compare "$c" > $OUT/passkey_$n.txt
  grep -A8 "accuracy\|passkey" $OUT/passkey_$n.txt | tail -12; date
done
