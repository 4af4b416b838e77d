#!/usr/bin/env bash
# GPU call P1 (issue 17): the start-up memory profile. GPU engine tests; the memory plan and the
# longest request at default settings (capacity.py); max_num_batched_tokens=16384 with the cache filled.
set -u
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; date
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_gpu_engine.py tests/test_memory_profile.py 2>&1 | tail -6
date
timeout 130 python3 .gpu/oom.py dense 2>&1 | grep -v "it/s\|s/it" | grep "^\[\|memory:\|captured\|Error\|error" | tail -12
date
R=streaming_sparsity=0.5,attn_pattern=random
timeout 90 python3 benchmarks/capacity.py --compare dense:max_num_seqs=64 --compare "stream50:$R,max_num_seqs=64" 2>&1 | grep -v "it/s\|s/it" | tail -6
date
