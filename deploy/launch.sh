#!/usr/bin/env bash
# One command per node: start this node's roles from a cluster config.
#   deploy/launch.sh deploy/cluster-two-nodes.yaml vision0     # on the vision node
#   deploy/launch.sh deploy/cluster-two-nodes.yaml lang0       # on the language node
# NODE defaults to this host's short name. Extra arguments go to `dvd launch` (e.g. --role language).
# The config is validated before anything starts (exit code 2 naming the node and key); SIGTERM
# stops every process it started.
set -euo pipefail
if [ $# -lt 1 ]; then
  echo "usage: $0 CONFIG [NODE] [dvd launch options...]" >&2
  exit 2
fi
CONFIG=$1
NODE=${2:-$(hostname -s)}
shift $(( $# >= 2 ? 2 : 1 ))
DVD=${DVD:-dvd}   # e.g. DVD="/opt/dvd/.venv/bin/dvd"
exec "$DVD" launch "$CONFIG" --node "$NODE" "$@"
