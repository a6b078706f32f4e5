#!/usr/bin/env bash
# Set up (see setup.sh) and run the test suite and the linter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
