#!/usr/bin/env bash
# Regenerates the Python stubs for the KMS v2 and v1beta1 protos and kleidi's remote protocol in this folder.
# The protos are written with the same package, service, message and field
# names as upstream k8s.io/kms, so the generated code speaks the apiserver's wire.
set -euo pipefail
cd "$(dirname "$0")/../.."
python -m grpc_tools.protoc -I . \
  --python_out=. --pyi_out=. --grpc_python_out=. \
  kleidi/api/v2.proto kleidi/api/v1beta1.proto kleidi/api/remote_v1.proto
