#!/usr/bin/env bash
# GPU call E: rope_mass at 512 tokens: re-selection interval and page size, NIAH / passkey with streaming / RULER.
set -u
cat /tmp/m/m.partaa .gpu/m.partab > /tmp/m/SmolLM2-135M-Instruct.gguf || exit 1
M=/tmp/m/SmolLM2-135M-Instruct.gguf
P=src/lserve/patterns/SmolLM2-135M-Instruct.json
W=prefill_sink_tokens=64,prefill_local_tokens=512,decode_sink_tokens=64,decode_local_tokens=512
S="streaming_sparsity=0.5,attn_pattern=$P,$W"
B=token_budget=512,page_score=rope_mass
EV() { local t=$1; shift; timeout $t python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' eval --model $M --max-num-seqs 16 --no-plots "$@" 2>&1 | grep -v "it/s\|s/it\|sample/s\|^  "; }
nvidia-smi --query-gpu=name --format=csv,noheader; date
EV 120 --task niah --lengths 2k,4k,6k --depths 0,0.25,0.5,0.75,1 --num-samples 4 --output-dir $OUT/niah \
  --compare "i2:$B,selector_interval=2" --compare "s+i1:$S,$B,selector_interval=1" --compare "s+i2:$S,$B,selector_interval=2" \
  --compare "pg32:$B,page_size=32" --compare "pg32-i2:$B,page_size=32,selector_interval=2" --compare "s+pg32-i2:$S,$B,page_size=32,selector_interval=2" \
  --compare "s+pg16-i1:$S,$B,page_size=16,selector_interval=1"
date
EV 200 --task passkey --lengths 4k,5k,6k,7k --num-samples 20 --output-dir $OUT/pk \
  --compare "s+i2:$S,$B,selector_interval=2" --compare "s+pg32:$S,$B,page_size=32" \
  --compare "s+pg32-i2:$S,$B,page_size=32,selector_interval=2" --compare "s+pg16-i2:$S,$B,page_size=16,selector_interval=2"
date
EV 150 --task ruler --subtasks niah_multikey,niah_multivalue,niah_multiquery --lengths 2k,4k,6k --num-samples 10 --output-dir $OUT/ruler \
  --compare "i1:$B,selector_interval=1" --compare "s+i1:$S,$B,selector_interval=1" --compare "i2:$B,selector_interval=2"
date
