#!/usr/bin/env bash
# The GPU machine's check in one command: bash bench/gpu_check.sh OUT [extra bench.gpu_check args]
# (`make gpu-check OUT=dir` runs this). It uses that machine's own python (PYTHON, default
# python3: torch 2.11 + triton 3.6 there), never the project .venv, and stops the whole run at
# GPU_CHECK_TIMEOUT seconds (default 480) even if a step's own limit failed to.
set -u
OUT="${1:?usage: bench/gpu_check.sh OUT [--steps ...] [--quick] [--device cpu]}"
shift
PY="${PYTHON:-python3}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# a fresh machine has no Triton cache; keep it inside the run (not in $OUT: it does not travel)
export TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-$(dirname "$(mktemp -u)")/lowbit-triton-cache}"
# every rank is on this machine: gloo over loopback (a sandbox's hostname may not resolve)
export GLOO_SOCKET_IFNAME="${GLOO_SOCKET_IFNAME:-lo}"
if command -v timeout >/dev/null; then
    timeout --kill-after=10 "${GPU_CHECK_TIMEOUT:-480}" "$PY" -m bench.gpu_check --out "$OUT" "$@"
else
    "$PY" -m bench.gpu_check --out "$OUT" "$@"
fi
rc=$?
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "gpu-check: stopped at ${GPU_CHECK_TIMEOUT:-480} s; the files under $OUT hold what had finished" >&2
fi
exit "$rc"
