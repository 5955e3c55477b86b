#!/usr/bin/env bash
# Set everything up and run DvD's main job end to end on this machine: build the tiny random-weight
# checkpoint if absent, encode an image with the vision half, move BF16 features to the language
# half, generate, and print the answer with per-stage timings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
CKPT=checkpoints/tiny
if [ ! -f "$CKPT/config.json" ]; then
  dvd make-checkpoint --preset tiny --out "$CKPT"
fi
dvd generate --model "$CKPT" --image "$CKPT/example.png" --prompt "Describe the image." --max-new-tokens 24
