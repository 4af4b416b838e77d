#!/usr/bin/env bash
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
timeout 120 python3 .gpu/fastacc.py 2>&1 | tee $OUT/fastacc.txt
