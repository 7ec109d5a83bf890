#!/usr/bin/env bash
# Set up, then run the quickstart demo: a small CNN on scikit-learn's digits, with and without frzcompile.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python examples/quickstart.py "$@"
