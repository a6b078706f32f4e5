#!/usr/bin/env bash
# Create a virtual environment (if needed) and install vlm_engine with the extras given as the
# first argument (default: dev).
#
#   VENV=DIR            the environment's folder (default .venv)
#   TRANSFORMERS=newest transformers unpinned and upgraded to the newest release pip resolves;
#                       otherwise the versions in constraints/ (transformers as on the GPU image)
#
# Without a GPU, torch is pinned to a CPU build (constraints/torch-cpu.txt); with one, the torch
# already installed on the machine is kept (the environment sees the system site-packages).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-dev}"
venv="${VENV:-.venv}"
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv --system-site-packages "$venv"
fi
pip=("$venv/bin/python" -m pip install -q)
constraints=()
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    on_gpu=1
else
    on_gpu=0
    # torch first, alone, so that no dependency resolves it to a CUDA build.
    "${pip[@]}" -c constraints/torch-cpu.txt torch
fi
if [ "${TRANSFORMERS:-pinned}" = newest ]; then
    [ "$on_gpu" = 1 ] || constraints=(-c constraints/torch-cpu.txt)
    "${pip[@]}" "${constraints[@]}" -e ".[$extras]"
    "${pip[@]}" "${constraints[@]}" --upgrade transformers
else
    [ "$on_gpu" = 1 ] && constraints=(-c constraints/common.txt) || constraints=(-c constraints/cpu.txt)
    "${pip[@]}" "${constraints[@]}" -e ".[$extras]"
fi
