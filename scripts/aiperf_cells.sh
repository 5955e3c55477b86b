#!/usr/bin/env bash
# NVIDIA AIPerf (a client DvD did not write) against coupled, DvD and DvD+ViR, as a user would run it: each
# deployment started by `dvd serve` with the paper placement, AIPerf sending one 896 px JPEG a request, 16 tokens
# of text, exactly 8 tokens out (ignore_eos), 16 in flight, 64 requests after 4 warm-ups. AIPerf is pinned to
# CPU 1 with the gateway. Install AIPerf in its own venv (it pulls a CUDA torch):
#   python3.11 -m venv /work/clients-venv && /work/clients-venv/bin/pip install aiperf
# Checkpoints: the 38b-scaled presets scripts/table18.sh builds. On a shared machine run it under nice -n -19.
set -u
cd "$(dirname "$0")/.."
. .venv/bin/activate
AIPERF=${AIPERF:-/work/clients-venv/bin/aiperf}
M=${MODEL:-/tmp/dvd-table18/internvl3_5-38b-scaled}
OUTDIR=${OUT:-/tmp/dvd-aiperf}
PX=${PX:-896}
mkdir -p "$OUTDIR"
run_cell() {  # name, model, dvd serve flags...
  local name=$1 model=$2; shift 2
  dvd serve --model "$model" --port 8011 --grpc-port 50811 --log-level WARNING "$@" > "$OUTDIR/$name-serve.log" 2>&1 &
  local pid=$!
  for _ in $(seq 1 300); do grep -q "ready" "$OUTDIR/$name-serve.log" && break; sleep 1; done
  echo "== $name: load average $(cut -d' ' -f1-3 /proc/loadavg)"
  taskset -c 1 "$AIPERF" profile --model "$(basename "$model")" --url http://127.0.0.1:8011 \
    --endpoint-type chat --streaming --tokenizer "$model" --use-server-token-count --request-count 64 \
    --warmup-request-count 4 --concurrency 16 --image-width-mean "$PX" --image-height-mean "$PX" \
    --image-batch-size 1 --image-format jpeg --synthetic-input-tokens-mean 16 --output-tokens-mean 8 \
    --extra-inputs ignore_eos:true --extra-inputs min_tokens:8 --random-seed 0 --ui-type simple \
    --artifact-dir "$OUTDIR/$name" > "$OUTDIR/$name.log" 2>&1
  echo "   aiperf exit $?; its table: $OUTDIR/$name.log"
  kill -TERM "$pid"; wait "$pid"
}
run_cell coupled "$M" --coupled --cpus 0
run_cell dvd "$M" --language-cpus 0 --vision-cpus 1 --gateway-cpus 1
run_cell dvd-vir "$M-flash" --language-cpus 0 --vision-cpus 1 --gateway-cpus 1
