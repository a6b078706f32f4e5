#!/usr/bin/env bash
# Set up (see setup.sh) and run the main job on the sample images in examples/images.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
HF_HUB_OFFLINE=1 .venv/bin/python -m vlm_engine.cli generate examples/images "$@"
