#!/usr/bin/env bash
# Three calls to one H100 (the GGUF file carried in two parts: .gpu/m.partaa copied to /tmp/m in a first call).
# --- common part of each call ---
set -u
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PYTHONPATH
[ -f /tmp/m/SmolLM2-135M-Instruct.gguf ] || cat /tmp/m/m.partaa .gpu/m.partab > /tmp/m/SmolLM2-135M-Instruct.gguf || exit 1
M=/tmp/m/SmolLM2-135M-Instruct.gguf
P=src/lserve/patterns/SmolLM2-135M-Instruct.json
W=prefill_sink_tokens=64,prefill_local_tokens=512,decode_sink_tokens=64,decode_local_tokens=512
S="streaming_sparsity=0.5,attn_pattern=$P,$W"
B="token_budget=512,page_score=rope_mass,selector_interval=1"
nvidia-smi --query-gpu=name --format=csv,noheader; date
EV() { local t=$1; shift; timeout $t python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' eval --model $M --max-num-seqs 16 --no-plots "$@" 2>&1 | grep -v "it/s\|s/it\|sample/s\|^  "; }
C16=(--compare dense: --compare "rm-p16:$B,page_size=16" --compare "rm-p16-l128:$B,page_size=16,selection_local_tokens=128" --compare "s+rm-p16:$S,$B,page_size=16" --compare "s+rm-p16-l128:$S,$B,page_size=16,selection_local_tokens=128")
# --- call 1: RULER sweep ---
# issue 23: RULER multi-key sweep: budget (is it the budget or the score?), dense layers, 16-token pages, streaming
L=selection_local_tokens=128
EV 420 --task ruler --subtasks niah_multikey,niah_multivalue,niah_multiquery --lengths 2k,4k,6k --num-samples 10 --output-dir $OUT/ruler \
  --compare dense: --compare "rm-l128:$B,$L" --compare "rm1024-l128:$B,$L,token_budget=1024" \
  --compare "rm2048-l128:$B,$L,token_budget=2048" --compare "rm-l128-d2:$B,$L,num_dense_layers=2" \
  --compare "rm-p16:$B,page_size=16" --compare "rm-p16-l128:$B,page_size=16,$L" \
  --compare "s+rm-p16-l128:$S,$B,page_size=16,$L"
date
# --- call 2: NIAH and passkey, 16-token pages ---
EV 130 --task niah --lengths 2k,4k,6k --depths 0,0.25,0.5,0.75,1 --num-samples 4 --output-dir $OUT/niah "${C16[@]}"
date
EV 250 --task passkey --lengths 2k,3k,4k,5k,6k,7k --num-samples 20 --output-dir $OUT/pk "${C16[@]}"
date
# --- call 3: RULER at 20 samples ---
L=selection_local_tokens=128
EV 230 --task ruler --subtasks niah_multikey,niah_multivalue,niah_multiquery --lengths 2k,4k,6k --num-samples 20 --output-dir $OUT/ruler20 \
  --compare dense: --compare "rm-l128:$B,$L" --compare "rm-p16-l128:$B,page_size=16,$L" --compare "s+rm-p16-l128:$S,$B,page_size=16,$L"
date
