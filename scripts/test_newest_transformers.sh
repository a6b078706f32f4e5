#!/usr/bin/env bash
# The transformers-sensitive tests (pytest marker "transformers": model and engine parity, image
# processing, processor files and chat templates, checkpoints written by transformers itself)
# against the newest transformers release pip resolves, in .venv-newest. scripts/test.sh runs
# this after the whole suite with the pinned release.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-newest TRANSFORMERS=newest bash scripts/setup.sh test
.venv-newest/bin/python -c "import transformers; print('newest transformers:', transformers.__version__)"
HF_HUB_OFFLINE=1 .venv-newest/bin/python -m pytest -q -m transformers "$@"
