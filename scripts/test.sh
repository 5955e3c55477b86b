#!/usr/bin/env bash
# Set everything up and run DvD's whole test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
DVD_EXTRAS=${DVD_EXTRAS:-rdma,cluster,otel} bash scripts/setup.sh
. .venv/bin/activate
ruff check .
python scripts/check_shape.py layers  # the import layers over the package as it installs
python scripts/check_shape.py types   # mypy over the package as it installs
python -m pytest -q -p no:cacheprovider "$@"
