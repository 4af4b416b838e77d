#!/usr/bin/env bash
# next (after t2.sh): RULER multi-key at 320 samples: the shipped selection with the first two layers dense, and at 1,024
source .gpu/common.sh
L=selection_local_tokens=128
R=(--task ruler --subtasks niah_multikey,niah_multivalue,niah_multiquery --lengths 2k,4k,6k --num-samples 320)
for c in "rm32-d2:$B,page_size=16,$L,score_channels=32,num_dense_layers=2" \
         "rm32-1k:token_budget=1024,page_score=rope_mass,selector_interval=1,page_size=16,$L,score_channels=32"; do
  n=${c%%:*}
  EV 270 "${R[@]}" --output-dir $OUT/r320_$n --compare "$c" > $OUT/ruler320_$n.txt
  grep "average\|time" $OUT/ruler320_$n.txt; date
done
