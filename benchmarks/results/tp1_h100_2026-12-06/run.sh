#!/usr/bin/env bash
# tensor_parallel_size=1 (commit 8902799) against the engine before tensor parallelism (commit e27caa4),
# one GPU, one run, two repetitions. The old tree was made with: mkdir -p .gpu/pretp && git archive e27caa4 src | tar -x -C .gpu/pretp
set -u
export PYTHONUNBUFFERED=1
S="streaming_sparsity=0.5,attn_pattern=random,prefill_sink_tokens=128,prefill_local_tokens=8192,decode_sink_tokens=128,decode_local_tokens=256"
D="$S,token_budget=4096,selector_interval=4"
L() { timeout $1 env PYTHONPATH=$2:$PWD python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' "${@:3}" 2>&1 | grep -v "it/s\|s/it"; }
for rep in 1 2; do
for tree in pretp head; do
  P=$PWD/src; [ $tree = pretp ] && P=$PWD/.gpu/pretp/src
  echo "== $tree (rep $rep)"
  L 100 $P bench --dummy-config llama-3-8b-262k --input-len 32k --output-len 64 --batch-size 1 --num-warmups 1 \
    --compare dense: --compare "sd:$D" --output-json $OUT/tp1_${tree}_$rep.json | tail -4
done
done
