#!/usr/bin/env bash
# call 2: GGUF part 2; RULER multi-key (40 samples) and passkey (20 per length) with rope_mass on 64 FP8 channels
source .gpu/common.sh
L=selection_local_tokens=128
X="$B,page_size=16,$L,score_channels=64,label_dtype=fp8"
EV 300 --task ruler --subtasks niah_multikey,niah_multivalue,niah_multiquery --lengths 2k,4k,6k --num-samples 40 \
  --output-dir $OUT/ruler40 --compare "rm64fp8-p16-l128:$X" | tee $OUT/ruler40.txt | tail -30
date
EV 240 --task passkey --lengths 2k,3k,4k,5k,6k,7k --num-samples 20 --output-dir $OUT/pk \
  --compare dense: --compare "rm64fp8:$X" --compare "s+rm64fp8:$S,$X" | tee $OUT/passkey.txt | tail -20
date
