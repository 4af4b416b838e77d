#!/usr/bin/env bash
# call 2: RULER 80 samples at 1,024 tokens (c5) + passkey 2K-7K 20/length: dense, FP8 KV alone, static+dynamic bf16 / FP8 KV
source .gpu/common.sh
EV 200 --task passkey --lengths 2k,3k,4k,5k,6k,7k --num-samples 20 --output-dir $OUT/passkey --compare dense: \
  --compare kv8:kv_cache_dtype=fp8 --compare "sd:$S,token_budget=512" --compare "sd-kv8:$S,token_budget=512,kv_cache_dtype=fp8" \
  > $OUT/passkey.txt
tail -22 $OUT/passkey.txt; date
source .gpu/c5.sh
[ $SECONDS -lt 480 ] && timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_channel_scores.py tests/test_page_scores.py 2>&1 | tail -8 | tee $OUT/gpu_tests.txt
date
