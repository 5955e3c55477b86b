#!/usr/bin/env bash
# Set everything up and run DvD's main job end to end on this machine: build the tiny random-weight
# checkpoint if absent, encode an image with the vision half, move BF16 features to the language
# half, generate, and print the answer with per-stage timings.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
CKPT=checkpoints/tiny
if [ ! -f "$CKPT/generation_config.json" ]; then
  dvd make-checkpoint --preset tiny --out "$CKPT"
fi
IMAGE=checkpoints/example.jpg
if [ ! -f "$IMAGE" ]; then
  python - "$IMAGE" <<'PY'
import sys
import numpy as np
from PIL import Image
y, x = np.mgrid[0:480, 0:640].astype(np.float32)
rgb = np.stack([127 + 100 * np.sin(x / 40 + c) * np.cos(y / 55 - c) for c in range(3)], -1)
Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(sys.argv[1], quality=90)
PY
fi
echo "--- dvd generate (tiny checkpoint: its weights are random, so the answer is gibberish) ---"
dvd generate --model "$CKPT" --image "$IMAGE" --prompt "Describe the image." --max-new-tokens 24
