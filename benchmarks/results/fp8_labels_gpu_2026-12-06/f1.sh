#!/usr/bin/env bash
# call 1: GGUF part 1; GPU tests of FP8 labels; lserve bench at 256K with FP8 labels
set -u
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; date; git log --oneline -1 2>/dev/null
date
S="streaming_sparsity=0.5,attn_pattern=random,prefill_sink_tokens=128,prefill_local_tokens=8192,decode_sink_tokens=128,decode_local_tokens=256"
D="$S,token_budget=4096,page_score=rope_mass,selector_interval=1"
timeout 320 python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' bench --dummy-config llama-3-8b-262k \
  --input-len 256k --output-len 32 --batch-size 1 --output-json $OUT/bench_256k.json --compare dense: \
  --compare "rm16:$D" --compare "rm16-fp8:$D,label_dtype=fp8" --compare "rm32-fp8:$D,score_channels=32,label_dtype=fp8" \
  2>&1 | grep -v "it/s\|s/it" | tee $OUT/bench_256k.txt | tail -12
date
