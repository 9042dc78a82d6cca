#!/usr/bin/env bash
# The prepared device check of the GPU issue: correctness first, then a speed table, in one run.
# On the lent GPU machine (torch installed, no Ray, no internet): first, here, `bash bench/gpu_wheels.sh`,
#   then run `bash bench/gpu_check.sh` there with `.gpu-wheels` carried.
# On this CPU machine, to test the script:  bash bench/gpu_check.sh --smoke
# `bash bench/gpu_check.sh --compile-cache [ARGS]` instead times a compiled replica's warm-up, cold and from a
#   compile cache (bench/compile_cache.py; RDM-768, bf16 + channels_last, batch 32 by default: ~3 min on a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ! "$PY" -c "import safetensors, open_clip" 2>/dev/null; then
    if ! ls .gpu-wheels/*.whl >/dev/null 2>&1; then
        echo "open_clip is not installed and .gpu-wheels/ is empty: run bench/gpu_wheels.sh where pip works" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/gpu-site .gpu-wheels/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/gpu-site"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [ "${1:-}" = "--compile-cache" ]; then
    shift
    JSON=(); [ -n "${OUT:-}" ] && JSON=(--json "$OUT/compile_cache.json")
    exec "$PY" bench/compile_cache.py --model rdm-768 --precision bf16 --channels-last --batch-sizes 32 "${JSON[@]}" "$@"
fi
JSON=(); [ -n "${OUT:-}" ] && JSON=(--json "$OUT/gpu_check.json")  # the device tool brings $OUT back
"$PY" bench/gpu_check.py "${JSON[@]}" "$@"
