#!/usr/bin/env bash
# GPU call 4: Gemma 3 270M passkey at 4K-32K (20 samples per length), dense vs page selection on the global layers.
set -u
cp .gpu/g.xz.03 /tmp/g/
mkdir -p /tmp/lc/models
cat /tmp/g/g.xz.0* | python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), open("/tmp/lc/models/gemma-3-270m-q4_k_m.gguf", "wb"), 1 << 24)'
sha256sum /tmp/lc/models/gemma-3-270m-q4_k_m.gguf
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export LSERVE_CACHE_DIR=/tmp/lc PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date
EV() { local t=$1; shift; timeout $t python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' eval --model gemma-3-270m --max-num-seqs 20 --no-plots "$@" 2>&1 | grep -v "it/s\|s/it\|sample/s\|^  "; }
EV 520 --task passkey --lengths 4k,8k,16k,32700 --num-samples 20 --output-dir $OUT/gpk \
  --compare dense:token_budget=0 --compare b512:token_budget=512 --compare b1024:token_budget=1024 \
  --compare b2048:token_budget=2048 --compare b1024-l128:token_budget=1024,selection_local_tokens=128
date
date
