#!/usr/bin/env bash
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader; date
timeout 150 python3 .gpu/fp8qk.py --n 32768 2>&1 | tee $OUT/fp8qk_probe.txt | tail -22
date
