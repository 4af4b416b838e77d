#!/usr/bin/env bash
# GPU call C: RULER multi-key with rope_mass; budgets and page sizes for streaming + rope_mass and NIAH.
set -u
M=/tmp/m/SmolLM2-135M-Instruct.gguf
P=src/lserve/patterns/SmolLM2-135M-Instruct.json
W=prefill_sink_tokens=64,prefill_local_tokens=512,decode_sink_tokens=64,decode_local_tokens=512
S="streaming_sparsity=0.5,attn_pattern=$P,$W"
B=token_budget=512
E() { python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' eval "$@" 2>&1 | grep -v "it/s\|s/it\|sample/s\|^  "; }
nvidia-smi --query-gpu=name --format=csv,noheader; date
timeout 200 python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' eval --task ruler --model $M --subtasks niah_multikey,niah_multivalue,niah_multiquery --lengths 2k,4k,6k --num-samples 10 --max-num-seqs 16 --output-dir $OUT/ruler --no-plots \
  --compare dense: --compare "rope_mass:$B,page_score=rope_mass" --compare "stream50+rope_mass:$S,$B,page_score=rope_mass" \
  --compare "rope_mass-b1024:token_budget=1024,page_score=rope_mass" --compare "rope_mass-pg16:$B,page_score=rope_mass,page_size=16" 2>&1 | grep -v "it/s\|s/it\|sample/s"
date
timeout 150 python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' eval --task niah --model $M --lengths 2k,4k,6k --depths 0,0.25,0.5,0.75,1 --num-samples 4 --max-num-seqs 16 --output-dir $OUT/niah2 --no-plots \
  --compare "rope_mass-b1024:token_budget=1024,page_score=rope_mass" --compare "s+rope_mass-b1024:$S,token_budget=1024,page_score=rope_mass" \
  --compare "rope_mass-pg16:$B,page_score=rope_mass,page_size=16" --compare "s+rope_mass-pg16:$S,$B,page_score=rope_mass,page_size=16" \
  --compare "rope_mass-i1:$B,page_score=rope_mass,selector_interval=1" 2>&1 | grep -v "it/s\|s/it\|sample/s"
date
timeout 200 python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' eval --task passkey --model $M --lengths 4k,5k,6k,7k --num-samples 20 --max-num-seqs 16 --output-dir $OUT/pk2 --no-plots \
  --compare "s+rope_mass-b1024:$S,token_budget=1024,page_score=rope_mass" --compare "s+rope_mass-pg16:$S,$B,page_score=rope_mass,page_size=16" \
  --compare "s+rope_mass-i1:$S,$B,page_score=rope_mass,selector_interval=1" 2>&1 | grep -v "it/s\|s/it\|sample/s"
date
