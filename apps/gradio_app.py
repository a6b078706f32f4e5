"""The Gradio demo app (also `vlm-engine demo`): ask about an image, watch the answer stream in.

`python apps/gradio_app.py` serves the built-in demo model on http://127.0.0.1:7860;
`--model DIR` takes an HF Gemma3 checkpoint, `--host 0.0.0.0` opens it to other machines.
"""

from __future__ import annotations

import argparse

from vlm_engine.webapp import launch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="HF Gemma3 checkpoint directory (default: built-in demo)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: local only)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    args = parser.parse_args()
    launch(args.model, args.host, args.port, args.device, args.dtype)


if __name__ == "__main__":
    main()
