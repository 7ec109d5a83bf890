#!/usr/bin/env bash
# Create .venv (if missing) and install frzcompile with what the demo and tests need. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first, pinned: on these machines torch==2.13.0 is the CPU wheel; an unpinned torch pulls CUDA builds.
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${FRZ_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
