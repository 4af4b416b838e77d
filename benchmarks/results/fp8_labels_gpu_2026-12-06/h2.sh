#!/usr/bin/env bash
# RULER multi-key, 80 samples per subtask and length: dense, 64 FP8 channels, 32 channels (shipped), exact (64 channels)
source .gpu/common.sh
L=selection_local_tokens=128
R=(--task ruler --subtasks niah_multikey,niah_multivalue,niah_multiquery --lengths 2k,4k,6k --num-samples 80)
for c in "dense:" "rm64fp8:$B,page_size=16,$L,score_channels=64,label_dtype=fp8" "rm32:$B,page_size=16,$L,score_channels=32" \
         "exact:$B,page_size=16,$L,score_channels=64"; do
  n=${c%%:*}
  EV 200 "${R[@]}" --output-dir $OUT/$n --compare "$c" > $OUT/ruler80_$n.txt
  grep "average\|time" $OUT/ruler80_$n.txt; date
done
