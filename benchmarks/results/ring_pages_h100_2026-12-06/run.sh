#!/usr/bin/env bash
# Issue 17 GPU check: ring pages on demand. GPU pool tests; capacity at max_num_seqs=64; full cache with streaming+selection.
set -u
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date; git log --oneline -1 2>/dev/null
R=streaming_sparsity=0.5,attn_pattern=random
timeout 150 python3 benchmarks/capacity.py --compare dense:max_num_seqs=64 --compare "stream50:$R,max_num_seqs=64" 2>&1 | grep -v "it/s\|s/it" | tail -8
date
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gpu_engine.py tests/test_ring_and_selection.py tests/test_window_triton.py tests/test_ring_pages.py 2>&1 | tail -12
date
timeout 150 python3 benchmarks/results/startup_profile_h100_2026-12-06/oom.py stream 2>&1 | grep -v "it/s\|s/it" | grep "^\[\|memory:\|captured\|Error\|error" | tail -12
date
