#!/usr/bin/env bash
# GPU call G5 (an H100 or H200): one 1M-token request end to end (prefill + 32 tokens), 50% streaming heads + FP8 KV
# (+ FP8 weights), Llama-3-8B shape with the window lifted; prefill time and peak memory.
set -u
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date
S="streaming_sparsity=0.5,attn_pattern=random,prefill_sink_tokens=128,prefill_local_tokens=8192,decode_sink_tokens=128,decode_local_tokens=256"
timeout 560 python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' bench --dummy-config llama-3-8b-262k \
  --input-len 1m --output-len 32 --batch-size 1 --num-warmups 0 --max-num-seqs 1 \
  --compare "s-kv8-w8:$S,kv_cache_dtype=fp8,quantization=fp8" --output-json $OUT/1m.json 2>&1 | grep -v "it/s\|s/it" | tail -5
date
