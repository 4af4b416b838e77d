#!/usr/bin/env bash
# call C: RULER multi-key, 80 samples, at a 1,024-token budget: dense, exact scores (64 channels), 32 channels (shipped), and dense in float32 (the noise of a small perturbation)
[ -n "${M:-}" ] || source .gpu/common.sh
L=selection_local_tokens=128
R=(--task ruler --subtasks niah_multikey,niah_multivalue,niah_multiquery --lengths 2k,4k,6k --num-samples 80)
for c in "dense:" "exact-1k:$B,page_size=16,$L,score_channels=64,token_budget=1024" \
         "rm32-1k:$B,page_size=16,$L,score_channels=32,token_budget=1024" "dense-f32:dtype=float32"; do
  n=${c%%:*}
  [ "$n" = dense-f32 ] && [ $SECONDS -gt 330 ] && { echo "skip $n (time)"; continue; }
  EV 200 "${R[@]}" --output-dir $OUT/$n --compare "$c" > $OUT/ruler80_$n.txt
  grep "average\|time" $OUT/ruler80_$n.txt; date
done
[ $SECONDS -lt 430 ] && EV 150 --task niah --lengths 2k,4k,6k --depths 0,0.25,0.5,0.75,1 --num-samples 4 --output-dir $OUT/niah \
  --compare dense: --compare "rm64fp8:$B,page_size=16,$L,score_channels=64,label_dtype=fp8" \
  --compare "s+rm64fp8:$S,$B,page_size=16,$L,score_channels=64,label_dtype=fp8" > $OUT/niah.txt
grep -A12 "accuracy\|average" $OUT/niah.txt | head -30; date
