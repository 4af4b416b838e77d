#!/usr/bin/env bash
OUT=${OUT:-/tmp/niah_fp8_labels}
mkdir -p "$OUT"
cd "$(git rev-parse --show-toplevel)"
P=src/lserve/patterns/SmolLM2-135M-Instruct.json
W=prefill_sink_tokens=64,prefill_local_tokens=512,decode_sink_tokens=64,decode_local_tokens=512
S="streaming_sparsity=0.5,attn_pattern=$P,$W"
B="token_budget=512,page_score=rope_mass,selector_interval=1,page_size=16,selection_local_tokens=128"
for c in "rm64fp8:$B,score_channels=64,label_dtype=fp8" "rm32:$B,score_channels=32" "dense:" \
         "s+rm64fp8:$S,$B,score_channels=64,label_dtype=fp8" "s+rm32:$S,$B,score_channels=32"; do
  n=${c%%:*}
  .venv/bin/lserve eval --task niah --lengths 2k,4k --depths 0,0.25,0.5,0.75,1 --num-samples 4 --no-plots \
    --output-dir $OUT/$n --compare "$c" 2>&1 | grep -v "sample/s\|s/sample" > $OUT/$n.txt
  date >> $OUT/times.txt
done
