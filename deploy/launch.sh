#!/usr/bin/env bash
# One command per node: start this node's roles from a cluster config.
#   deploy/launch.sh deploy/cluster-two-nodes.yaml vision0     # on the vision node
#   deploy/launch.sh deploy/cluster-two-nodes.yaml lang0       # on the language node
# Without NODE, `dvd launch` picks it: the config's only node, or the one named like this host
# (`hostname`, or its short name). Extra arguments go to `dvd launch` (e.g. --role language), with
# or without NODE before them.
# The config is validated before anything starts (exit code 2 naming the node and key); SIGTERM
# stops every process it started.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [NODE] [dvd launch options...]" >&2
  exit 2
fi
CONFIG=$1
shift
NODE=()
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then  # a second argument that is not an option names the node
  NODE=(--node "$1")
  shift
fi
DVD=${DVD:-dvd}   # e.g. DVD="/opt/dvd/.venv/bin/dvd"
exec "$DVD" launch "$CONFIG" "${NODE[@]}" "$@"
