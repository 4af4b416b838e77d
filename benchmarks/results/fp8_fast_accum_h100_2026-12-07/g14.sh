#!/usr/bin/env bash
source .gpu/common.sh
C=(--compare bf16:dtype=bfloat16 --compare w8:dtype=bfloat16,quantization=fp8
   --compare w8kv8:dtype=bfloat16,quantization=fp8,kv_cache_dtype=fp8)
for m in fast exact; do
  timeout 120 python3 .gpu/ppl_fast.py $m --model $M --text-file .gpu/GPL-3 --window 2048 "${C[@]}" \
    --output-json $OUT/ppl_$m.json 2>&1 | grep -v "it/s\|s/it" | tail -6 | tee $OUT/ppl_$m.txt
done
date
