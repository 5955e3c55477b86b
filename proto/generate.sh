#!/usr/bin/env bash
# Regenerate the Python gRPC modules from proto/dvd/v1/*.proto. Run from anywhere; the generated
# *_pb2*.py files are committed so that installing DvD needs no protoc.
# Imports are rooted at the repository (-I .), so generated code imports `proto.dvd.v1.*_pb2`.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I . --python_out=. --grpc_python_out=. --pyi_out=. proto/dvd/v1/*.proto
