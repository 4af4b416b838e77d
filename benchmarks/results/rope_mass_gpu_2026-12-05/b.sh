#!/usr/bin/env bash
# GPU call B: passkey and NIAH with rope_mass (alone, with the shipped 50% streaming heads) against dense.
set -u
cat /tmp/m/m.partaa .gpu/m.partab > /tmp/m/SmolLM2-135M-Instruct.gguf || exit 1
M=/tmp/m/SmolLM2-135M-Instruct.gguf
L() { python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' "$@"; }
P=src/lserve/patterns/SmolLM2-135M-Instruct.json
W=prefill_sink_tokens=64,prefill_local_tokens=512,decode_sink_tokens=64,decode_local_tokens=512
S="streaming_sparsity=0.5,attn_pattern=$P,$W"
B=token_budget=512
nvidia-smi --query-gpu=name --format=csv,noheader; date
timeout 300 python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' eval --task passkey --model $M --lengths 2k,3k,4k,5k,6k,7k --num-samples 20 --max-num-seqs 16 --output-dir $OUT/passkey --no-plots \
  --compare dense: --compare "rope_mass:$B,page_score=rope_mass" --compare "stream50:$S" \
  --compare "stream50+rope_mass:$S,$B,page_score=rope_mass" --compare "rope_mass-p0.9:$B,page_score=rope_mass,selection_top_p=0.9" \
  --compare "auto:$B" --compare "stream50+auto:$S,$B" 2>&1 | grep -v "it/s\|s/it\|sample/s"
date
timeout 250 python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' eval --task niah --model $M --lengths 2k,4k,6k --depths 0,0.25,0.5,0.75,1 --num-samples 4 --max-num-seqs 16 --output-dir $OUT/niah --no-plots \
  --compare dense: --compare "rope_mass:$B,page_score=rope_mass" --compare "stream50:$S" --compare "stream50+rope_mass:$S,$B,page_score=rope_mass" \
  2>&1 | grep -v "it/s\|s/it\|sample/s"
date
