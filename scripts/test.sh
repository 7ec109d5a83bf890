#!/usr/bin/env bash
# Set up, then run the test suite (CPU only; no GPU or network needed).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
