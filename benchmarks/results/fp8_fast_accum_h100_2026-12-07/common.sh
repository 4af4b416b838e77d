set -u
export PYTHONPATH=$PWD/src:$PWD PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PYTHONPATH
[ -f /tmp/m/SmolLM2-135M-Instruct.gguf ] || cat /tmp/m/m.partaa .gpu/m.partab > /tmp/m/SmolLM2-135M-Instruct.gguf || exit 1
M=/tmp/m/SmolLM2-135M-Instruct.gguf
P=src/lserve/patterns/SmolLM2-135M-Instruct.json
W=prefill_sink_tokens=64,prefill_local_tokens=512,decode_sink_tokens=64,decode_local_tokens=512
S="streaming_sparsity=0.5,attn_pattern=$P,$W"
B="token_budget=512,page_score=rope_mass,selector_interval=1"
nvidia-smi --query-gpu=name --format=csv,noheader; date
EV() { local t=$1; shift; timeout $t python3 -c 'import sys; from lserve.cli import main; sys.exit(main())' eval --model $M --max-num-seqs 16 --no-plots "$@" 2>&1 | grep -v "it/s\|s/it\|sample/s\|^  "; }
C16=(--compare dense: --compare "rm-p16:$B,page_size=16" --compare "rm-p16-l128:$B,page_size=16,selection_local_tokens=128" --compare "s+rm-p16:$S,$B,page_size=16" --compare "s+rm-p16-l128:$S,$B,page_size=16,selection_local_tokens=128")
