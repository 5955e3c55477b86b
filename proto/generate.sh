#!/usr/bin/env bash
# Regenerate the Python gRPC modules from proto/dvd/v1/*.proto into dvd/v1/. Run from anywhere; the
# generated *_pb2*.py files are committed so that installing DvD needs no protoc.
# The include root is proto/, so the proto package `dvd.v1` is also the Python import path
# (`from dvd.v1 import vision_pb2`): nothing installs a top-level `proto` module, a name that
# belongs to proto-plus (every google-cloud library depends on it).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I proto --python_out=. --grpc_python_out=. --pyi_out=. proto/dvd/v1/*.proto
