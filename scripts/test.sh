#!/usr/bin/env bash
# Set up .venv on a fresh machine (CPU torch when there is no CUDA GPU) and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
exec "$PY" -m pytest -q "$@"
