#!/usr/bin/env bash
# GPU call Q4: Gemma 3 270M passkey at 8K and 16K (20 samples per length): page scores on the global layers,
# re-selected every step, at a 1,024-token budget (issue 16 / 23).
set -u
cp .gpu/g.xz.03 /tmp/g/
mkdir -p /tmp/lc/models
[ -f /tmp/lc/models/gemma-3-270m-q4_k_m.gguf ] || cat /tmp/g/g.xz.0* | python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), open("/tmp/lc/models/gemma-3-270m-q4_k_m.gguf", "wb"), 1 << 24)'
sha256sum /tmp/lc/models/gemma-3-270m-q4_k_m.gguf
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export LSERVE_CACHE_DIR=/tmp/lc PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date
B=token_budget=1024,selector_interval=1
timeout 300 python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' eval --model gemma-3-270m --max-num-seqs 20 --no-plots \
  --task passkey --lengths 8k,16k --num-samples 20 --output-dir $OUT/gpk2 \
  --compare dense:token_budget=0 --compare "rope_channels-i1:$B,page_score=rope_channels" \
  --compare "rope_mass-i1:$B,page_score=rope_mass" --compare "quest-i1:$B,page_score=quest" \
  --compare "midrange-i1:$B,page_score=midrange" 2>&1 | grep -v "it/s\|s/it\|sample/s\|^  "
date
