#!/usr/bin/env bash
# Create .venv (if needed) and install vlm_engine with the extras given as arguments.
# Without a GPU, torch is pinned to a CPU build through constraints/cpu.txt; with one, the torch
# already installed on the machine is kept (the venv sees the system site-packages).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$python" -m venv --system-site-packages .venv
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    constraints=constraints/common.txt
else
    constraints=constraints/cpu.txt
    # torch first, alone, so that no dependency resolves it to a CUDA build.
    .venv/bin/python -m pip install -q -c "$constraints" torch
fi
.venv/bin/python -m pip install -q -c "$constraints" -e ".[$extras]"
