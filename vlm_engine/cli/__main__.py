"""`python -m vlm_engine.cli`: the `vlm-engine` command."""

import sys

from vlm_engine.cli import main

if __name__ == "__main__":
    sys.exit(main())
