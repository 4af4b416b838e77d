#!/usr/bin/env bash
# GPU call A: kernel tests on the GPU, one layer's parts with rope_mass, lserve bench at 256K.
set -u
L() { python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' "$@"; }
nvidia-smi --query-gpu=name --format=csv,noheader; date
mkdir -p /tmp/m && cp .gpu/m.partaa /tmp/m/
timeout 170 python3 -m pytest -q -x tests/test_channel_scores.py tests/test_page_scores.py tests/test_ring_and_selection.py -p no:cacheprovider 2>&1 | tail -5
date
(cd benchmarks && timeout 90 python3 decode_layer_parts.py --lengths 262144 --batches 1 --splits 1) 2>&1 | tee $OUT/parts.txt | grep -i "score\|select\|#"
date
S="streaming_sparsity=0.5,attn_pattern=random,prefill_sink_tokens=128,prefill_local_tokens=8192,decode_sink_tokens=128,decode_local_tokens=256"
D="$S,token_budget=4096,selector_interval=4"
timeout 300 python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' bench --dummy-config llama-3-8b-262k --input-len 256k --output-len 32 --batch-size 1 --compare dense: \
  --compare "sd-rope8:$D,page_score=rope_channels" --compare "sd-rope_mass:$D,page_score=rope_mass" \
  --compare "sd-rope_mass-p0.9:$D,page_score=rope_mass,selection_top_p=0.9" --output-json $OUT/bench256k.json 2>&1 | grep -v "it/s\|s/it"
date
