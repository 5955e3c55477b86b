#!/usr/bin/env bash
# Set up DvD in ./.venv: the CPU torch wheel first (any other torch request pulls a multi-GB CUDA
# build), then the project with its test and RDMA extras. Safe to run again: it only adds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
# The multi-host tests (tests/multihost) build network namespaces with ip and tc: install iproute2
# only where it is missing and apt can (as root); elsewhere those tests skip, saying why.
if ! command -v ip >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null
fi
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>/dev/null
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "torch==2.13.0"
fi
# pip's own build warnings are noise here; show them only when the install fails
log=$(mktemp)
if ! python -m pip install -q -e ".[dev${DVD_EXTRAS:+,$DVD_EXTRAS}]" >"$log" 2>&1; then
  cat "$log"
  rm -f "$log"
  exit 1
fi
rm -f "$log"
