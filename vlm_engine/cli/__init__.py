"""`vlm-engine`: caption images in batches, serve the demo web app or the OpenAI API, or answer a
prompt per image.

Without `--model`, every command uses the built-in demo model, a small Gemma3 trained to caption
pictures of shapes (`vlm_engine.demo`); `--model DIR` takes any HF Gemma3 checkpoint directory.
"""

from __future__ import annotations

import argparse

from vlm_engine.captioning import find_images
from vlm_engine.cli.caption import add_caption_parser
from vlm_engine.cli.options import USAGE_ERRORS, add_model_options
from vlm_engine.demo.model import DEMO_PROMPT, default_model_path, demo_request
from vlm_engine.sampling_params import SamplingParams
from vlm_engine.server.options import DESCRIPTION as SERVE_DESCRIPTION
from vlm_engine.server.options import EPILOG as SERVE_EPILOG
from vlm_engine.server.options import add_serve_options

DESCRIPTION = """\
Run Gemma3 vision-language models with vlm_engine. Without --model every command uses the
built-in demo model, which captions pictures of shapes; --model DIR takes any HF Gemma3
checkpoint directory. `vlm-engine COMMAND --help` explains each command."""

EPILOG = """\
examples:
  vlm-engine caption examples/images -o captions.jsonl   caption a folder into JSONL, resumably
  vlm-engine demo --port 7860                             web app at http://127.0.0.1:7860
  vlm-engine generate examples/images                     print one answer per image
  vlm-engine serve --port 8000                            the OpenAI API at http://127.0.0.1:8000/v1"""

DEMO_DESCRIPTION = """\
Serve the Gradio web app: upload a picture, get its caption. Needs the app extra
(pip install 'vlm_engine[app]'). It binds to 127.0.0.1, reachable from this machine only,
unless --host says otherwise."""

DEMO_EPILOG = """\
examples:
  vlm-engine demo                                      the demo model at http://127.0.0.1:7860
  vlm-engine demo --model ~/models/gemma-3-4b-it --port 8080
  vlm-engine demo --host 0.0.0.0                       reachable from other machines too"""

GENERATE_DESCRIPTION = """\
Answer a prompt about each image (files or folders), batched, greedy; prints one line per
image: its file name, a tab, and the answer as a Python string literal."""

GENERATE_EPILOG = """\
examples:
  vlm-engine generate examples/images
  vlm-engine generate cat.jpg dog.png --model ~/models/gemma-3-4b-it --prompt 'What animal?'"""


# ---- demo --------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        from vlm_engine import webapp  # gradio (optional, slow to import) only when asked for

        webapp.launch(
            model=args.model,
            host=args.host,
            port=args.port,
            device=args.device,
            dtype=args.dtype,
            quantization=args.quantization,
        )
    except ModuleNotFoundError as e:
        if e.name != "gradio":
            raise
        args.parser.error("the web app needs gradio: pip install 'vlm_engine[app]'")
    return 0


def add_demo_parser(sub) -> None:
    demo = sub.add_parser(
        "demo",
        help="serve the Gradio web app (upload a picture, get its caption)",
        description=DEMO_DESCRIPTION,
        epilog=DEMO_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_options(demo)
    demo.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default: %(default)s, this machine only; 0.0.0.0 for every "
        "interface)",
    )
    demo.add_argument("--port", type=int, default=7860, help="port (default: %(default)s)")
    demo.set_defaults(func=cmd_demo, parser=demo)


# ---- generate ----------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace) -> int:
    from vlm_engine.engine import Engine  # torch and transformers: not for --help

    paths = find_images(args.images)
    prompts = [demo_request(str(path), args.prompt) for path in paths]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    with Engine(
        args.model or default_model_path(), device=args.device, dtype=args.dtype,
        quantization=args.quantization,
    ) as engine:  # fmt: skip
        outputs = engine.generate(prompts, params)
    for path, out in zip(paths, outputs, strict=True):
        print(f"{path.name}\t{out.text!r}")
    return 0


def add_generate_parser(sub) -> None:
    gen = sub.add_parser(
        "generate",
        help="answer a prompt about each image, printing one line per image (greedy)",
        description=GENERATE_DESCRIPTION,
        epilog=GENERATE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    gen.add_argument("images", nargs="+", help="image files or folders of images")
    add_model_options(gen)
    gen.add_argument(
        "--prompt",
        default=DEMO_PROMPT,
        help="question for every image (default: the one the demo model was trained on)",
    )
    gen.add_argument("--max-tokens", type=int, default=16, help="tokens to generate per image")
    gen.set_defaults(func=cmd_generate, parser=gen)


# ---- serve -------------------------------------------------------------------------------------


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from vlm_engine.server.main import serve  # fastapi and uvicorn only when asked for
    except ModuleNotFoundError as e:
        if e.name not in ("fastapi", "uvicorn", "prometheus_client", "httpx"):
            raise
        args.parser.error("the server needs its extra: pip install 'vlm_engine[serve]'")
    try:
        return serve(args)
    except USAGE_ERRORS as e:
        args.parser.error(str(e))


def add_serve_parser(sub) -> None:
    parser = sub.add_parser(
        "serve",
        help="serve the OpenAI API (chat completions with images) over HTTP",
        description=SERVE_DESCRIPTION,
        epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_serve_options(parser)
    parser.set_defaults(func=cmd_serve, parser=parser)


# ---- main --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlm-engine",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_caption_parser(sub)
    add_demo_parser(sub)
    add_generate_parser(sub)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
