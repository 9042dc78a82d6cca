#!/usr/bin/env bash
# The prepared device check of the GPU issue: correctness first, then a speed table, in one run.
# On the lent GPU machine (torch installed, no Ray):  bash bench/gpu_check.sh
# On this CPU machine, to test the script:              bash bench/gpu_check.sh --smoke
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -c "import safetensors, open_clip" 2>/dev/null || pip install -q safetensors open_clip_torch pyyaml
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
"$PY" bench/gpu_check.py "$@"
