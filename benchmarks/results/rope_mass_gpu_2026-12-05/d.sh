#!/usr/bin/env bash
# GPU call D: rope_mass tiling, lserve bench at 256K with re-selection every 4/2/1 steps.
set -u
nvidia-smi --query-gpu=name --format=csv,noheader; date
mkdir -p /tmp/m && cp .gpu/m.partaa /tmp/m/
(cd benchmarks && timeout 100 python3 decode_layer_parts.py --lengths 262144 --batches 1 --splits 1) 2>&1 | tee $OUT/parts.txt | grep -i "mass\|select\|#"
date
S="streaming_sparsity=0.5,attn_pattern=random,prefill_sink_tokens=128,prefill_local_tokens=8192,decode_sink_tokens=128,decode_local_tokens=256"
D="$S,token_budget=4096,page_score=rope_mass"
timeout 330 python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' bench --dummy-config llama-3-8b-262k --input-len 256k --output-len 32 --batch-size 1 --compare dense: \
  --compare "sd-rope_mass-i4:$D,selector_interval=4" --compare "sd-rope_mass-i2:$D,selector_interval=2" \
  --compare "sd-rope_mass-i1:$D,selector_interval=1" --output-json $OUT/bench256k.json 2>&1 | grep -v "it/s\|s/it"
date
