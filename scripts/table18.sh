#!/usr/bin/env bash
# Table 18 against the coupled baseline (one engine, the vision encoder in its step), every cell with its limits:
# `dvd bench compare` for each preset (38b- and 8b-scaled), setting (paper, equal) and requests in flight
# (8, 16, 32), all three buckets (448, 896, 1344 px) and compare's default modes (coupled, dvd, dvd+vir; in the
# equal setting also coupled-dp, a coupled replica per CPU, the best coupled baseline on that hardware); the
# 16-in-flight runs also measure the text-only TPOT p99 while 1344 px requests arrive. Each run's table,
# limits and every figure go to benchmarks/results/table18-<preset>-<setting>-c<N>.json, its output to the
# matching .txt. Meant for a quiet machine: it prints the load average before each run (and compare puts it
# in the JSON); about 15-25 minutes per run on a 2-core CPU, so the whole grid takes hours. Narrow it with
# the variables below, e.g.  PRESETS=38b SETTINGS=paper CONCURRENCY=16 bash scripts/table18.sh
# On a machine others share, run it as root under `nice -n -19 bash scripts/table18.sh`: its servers then take the
# CPUs they are pinned to whenever they want them (CFS weights nice -19 about 70x a nice-0 task), so the figures
# are the deployments' own; each JSON records the niceness beside the load average.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate

PRESETS=${PRESETS:-"38b 8b"}
SETTINGS=${SETTINGS:-"paper equal"}
CONCURRENCY=${CONCURRENCY:-"8 16 32"}
BUCKETS=${BUCKETS:-"448,896,1344"}
NUM_PROMPTS=${NUM_PROMPTS:-64}
OUTPUT_LEN=${OUTPUT_LEN:-8}
CHECKPOINTS=${CHECKPOINTS:-/tmp/dvd-table18}   # built once: the random-weight presets, with and without ViR
OUT=${OUT:-benchmarks/results}

mkdir -p "$CHECKPOINTS" "$OUT"
for preset in $PRESETS; do
  name="internvl3_5-${preset}-scaled"
  for flash in "" "--flash"; do
    dir="$CHECKPOINTS/$name${flash:+-flash}"
    [ -f "$dir/config.json" ] || dvd make-checkpoint --preset "$name" $flash --out "$dir"
  done
  for setting in $SETTINGS; do
    for c in $CONCURRENCY; do
      tag="table18-${preset}-scaled-${setting}-c${c}"
      interference=0
      [ "$c" = 16 ] && interference=16   # text-only TPOT p99 under 1344 px traffic: 16 text + 16 image requests
      echo "== $tag: load average $(cut -d' ' -f1-3 /proc/loadavg)"
      dvd bench compare --model "$CHECKPOINTS/$name" --vir-model "$CHECKPOINTS/$name-flash" \
        --setting "$setting" --buckets "$BUCKETS" --num-prompts "$NUM_PROMPTS" --output-len "$OUTPUT_LEN" \
        --max-concurrency "$c" --interference-prompts "$interference" --quiet \
        --json "$OUT/$tag.json" 2>&1 | tee "$OUT/$tag.txt"
    done
  done
done
