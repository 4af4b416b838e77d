#!/usr/bin/env bash
# GPU call N4 (after q0, h2, h3 on a warm machine; carries .gpu/g.xz.03 and .whl): Gemma 3 270M passkey at 4K-32K x 20,
# dense against the shipped selection choice (token_budget=1024: rope_channels every step, from patterns/gemma-3-270m.json).
set -u
cp .gpu/g.xz.03 /tmp/g/
mkdir -p /tmp/lc/models
cat /tmp/g/g.xz.0* | python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), open("/tmp/lc/models/gemma-3-270m-q4_k_m.gguf", "wb"), 1 << 24)'
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export LSERVE_CACHE_DIR=/tmp/lc PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; date
timeout 400 python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' eval --model gemma-3-270m --max-num-seqs 20 --no-plots \
  --task passkey --lengths 4k,8k,16k,32700 --num-samples 20 --output-dir $OUT/gpk4 \
  --compare dense:token_budget=0 --compare "shipped-1024:token_budget=1024" 2>&1 | grep -v "it/s\|s/it\|sample/s\|^  "
date
