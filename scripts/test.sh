#!/usr/bin/env bash
# Set up (see setup.sh) and run the linter and the test suite with the pinned versions, then the
# transformers-sensitive tests again with the newest transformers (test_newest_transformers.sh).
# Arguments go to the first pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# The web app's browser test drives Debian's Chromium (Playwright downloads no browser here).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null; then
    as_root=""
    [ "$(id -u)" -eq 0 ] || as_root="sudo -n"
    { $as_root apt-get update -qq && $as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends chromium; } >/dev/null ||
        echo "test.sh: could not install chromium; the browser test will skip" >&2
fi
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
.venv/bin/lint-imports
.venv/bin/python -c "import transformers; print('pinned transformers:', transformers.__version__)"
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
bash scripts/test_newest_transformers.sh
