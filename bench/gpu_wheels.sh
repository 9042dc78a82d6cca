#!/usr/bin/env bash
# Download, here, the pure-Python wheels the lent GPU machine lacks (it has torch, torchvision, timm,
# safetensors, regex, huggingface_hub, pyyaml; not open_clip or ftfy, and it cannot reach PyPI) into
# .gpu-wheels/ (git-ignored). Then run the check there with that folder carried:
#   device run: carry [".gpu-wheels"], command "bash bench/gpu_check.sh"
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
rm -rf .gpu-wheels && mkdir -p .gpu-wheels
"$PY" -m pip download -q --no-deps --only-binary=:all: -d .gpu-wheels \
    "open_clip_torch==3.3.0" "ftfy==6.3.1" "wcwidth==0.9.4"
ls -1 .gpu-wheels
