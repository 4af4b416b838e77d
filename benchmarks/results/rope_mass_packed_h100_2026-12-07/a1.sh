#!/usr/bin/env bash
# one call: GPU tests of the packed rope_mass and radix search; micro-benchmarks; lserve bench at 256K
set -u
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; date
timeout 110 python3 -m pytest -q -p no:cacheprovider -x tests/test_channel_scores.py tests/test_page_scores.py 2>&1 | tail -6 | tee $OUT/gpu_tests.txt
timeout 60 python3 -m pytest -q -p no:cacheprovider -x tests/test_fp8_kv.py -k kv_append 2>&1 | tail -3 | tee -a $OUT/gpu_tests.txt
date
timeout 120 python3 .gpu/m1.py 2>&1 | tee $OUT/micro.txt
python3 .gpu/pick.py $OUT/micro.txt | tee -a $OUT/micro.txt
date
S="streaming_sparsity=0.5,attn_pattern=random,prefill_sink_tokens=128,prefill_local_tokens=8192,decode_sink_tokens=128,decode_local_tokens=256"
D="$S,token_budget=4096,page_score=rope_mass"
timeout 250 python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' bench --dummy-config llama-3-8b-262k \
  --input-len 256k --output-len 32 --batch-size 1 --output-json $OUT/bench_256k.json --compare dense: \
  --compare "rm-i1:$D,selector_interval=1" \
  --compare "sd-kv8-w8:$S,token_budget=4096,selector_interval=4,kv_cache_dtype=fp8,quantization=fp8" \
  2>&1 | grep -v "it/s\|s/it" | tee $OUT/bench_256k.txt | tail -12
date
