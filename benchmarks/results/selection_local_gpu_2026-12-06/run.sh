#!/usr/bin/env bash
# GPU call E1 (carries .gpu/m.partab and .whl): selection_local_tokens=128 (and 16-token pages) on the default model (issue 23):
# passkey 2K-7K x 20, NIAH, RULER multi-key; rope_mass every step at 512 tokens, alone and with the streaming heads.
set -u
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PYTHONPATH
cat /tmp/m/m.partaa .gpu/m.partab > /tmp/m/SmolLM2-135M-Instruct.gguf || exit 1
M=/tmp/m/SmolLM2-135M-Instruct.gguf
P=src/lserve/patterns/SmolLM2-135M-Instruct.json
W=prefill_sink_tokens=64,prefill_local_tokens=512,decode_sink_tokens=64,decode_local_tokens=512
S="streaming_sparsity=0.5,attn_pattern=$P,$W"
B="token_budget=512,page_score=rope_mass,selector_interval=1"
nvidia-smi --query-gpu=name --format=csv,noheader; date
EV() { local t=$1; shift; timeout $t python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' eval --model $M --max-num-seqs 16 --no-plots "$@" 2>&1 | grep -v "it/s\|s/it\|sample/s\|^  "; }
EV 240 --task passkey --lengths 2k,3k,4k,5k,6k,7k --num-samples 20 --output-dir $OUT/pk \
  --compare dense: --compare "rm:$B" --compare "rm-l128:$B,selection_local_tokens=128" --compare "s+rm:$S,$B" \
  --compare "s+rm-l128:$S,$B,selection_local_tokens=128" --compare "s+rm-p16:$S,$B,page_size=16"
date
EV 150 --task niah --lengths 2k,4k,6k --depths 0,0.25,0.5,0.75,1 --num-samples 4 --output-dir $OUT/niah \
  --compare dense: --compare "rm-l128:$B,selection_local_tokens=128" --compare "s+rm-l128:$S,$B,selection_local_tokens=128"
date
EV 180 --task ruler --subtasks niah_multikey,niah_multivalue,niah_multiquery --lengths 2k,4k,6k --num-samples 10 \
  --output-dir $OUT/ruler --compare dense: --compare "rm-l128:$B,selection_local_tokens=128" \
  --compare "s+rm-l128:$S,$B,selection_local_tokens=128"
date
