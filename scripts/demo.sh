#!/usr/bin/env bash
# Set everything up and run DvD's main job end to end on this machine: `dvd serve` (a gateway, a
# vision server and a language server as separate processes, features over tcp) on the built-in
# tiny random-weight checkpoint, then one real request with an image through the OpenAI API,
# printing the answer and the per-stage timings. Everything started here is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
mkdir -p checkpoints
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
PORT=${DVD_DEMO_PORT:-8000}
LOG=$(mktemp)
dvd serve --port "$PORT" --grpc-port 0 >"$LOG" 2>&1 &
SERVE=$!
trap 'kill -TERM $SERVE 2>/dev/null; wait $SERVE 2>/dev/null; rm -f "$LOG"' EXIT
for _ in $(seq 600); do
  grep -q "dvd serve: ready" "$LOG" && break
  if ! kill -0 $SERVE 2>/dev/null; then cat "$LOG"; echo "dvd serve exited" >&2; exit 1; fi
  sleep 0.5
done
grep "dvd serve:" "$LOG"
python scripts/demo_request.py "http://127.0.0.1:$PORT/v1" "$IMAGE"
