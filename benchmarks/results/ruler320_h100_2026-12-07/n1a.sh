#!/usr/bin/env bash
# next, call A (after t2.sh): RULER multi-key at 320 samples per subtask and length: dense and the shipped selection at 512
source .gpu/common.sh
L=selection_local_tokens=128
R=(--task ruler --subtasks niah_multikey,niah_multivalue,niah_multiquery --lengths 2k,4k,6k --num-samples 320)
for c in "dense:" "rm32:$B,page_size=16,$L,score_channels=32"; do
  n=${c%%:*}
  EV 260 "${R[@]}" --output-dir $OUT/r320_$n --compare "$c" > $OUT/ruler320_$n.txt
  grep "average\|time" $OUT/ruler320_$n.txt; date
done
