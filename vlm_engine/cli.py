"""`vlm-engine`: caption images in batches, serve the demo web app or the OpenAI API, or answer a
prompt per image.

Without `--model`, every command uses the built-in demo model, a small Gemma3 trained to caption
pictures of shapes (`vlm_engine.demo`); `--model DIR` takes any HF Gemma3 checkpoint directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlm_engine.caption_file import CaptionFileError
from vlm_engine.captioning import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_TOKENS,
    caption_sources,
    find_images,
)
from vlm_engine.demo.model import DEMO_PROMPT, default_model_path, demo_request
from vlm_engine.errors import CheckpointError, ConfigError, InvalidSamplingParamsError
from vlm_engine.quant_config import QUANTIZATIONS
from vlm_engine.sampling_params import SamplingParams
from vlm_engine.server.options import DESCRIPTION as SERVE_DESCRIPTION
from vlm_engine.server.options import EPILOG as SERVE_EPILOG
from vlm_engine.server.options import add_serve_options

# Errors a user fixes by changing the command line: reported as usage errors, no traceback.
USAGE_ERRORS = (
    CaptionFileError,
    InvalidSamplingParamsError,
    ConfigError,
    CheckpointError,
    FileNotFoundError,
)

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

CAPTION_DESCRIPTION = """\
Caption many images into a JSONL or CSV file (one row per image: path, caption, error).
Images are queued --batch-size at a time, the next batch as soon as half the running ones are
done; rows are written in input order. An image the engine rejects (corrupt, not an image,
missing) gets a row with its error ("CorruptImageError: ...") and the run goes on.
Rerunning with the same output skips the images already in it, so an interrupted run resumes
(a row cut off by the interruption is redone); delete a row to caption that image again.
A summary (captioned, skipped, errors, elapsed, images/s) is printed at the end.
With --json-schema, --regex, --choice or --grammar every caption is held to that constraint
while it is decoded, and each row gains "parsed": the JSON value the caption states (for a
regex, choice or grammar: the caption). A caption cut off by --max-tokens before its constraint
is complete keeps its text and gets an IncompleteOutputError."""

CAPTION_EPILOG = """\
examples:
  vlm-engine caption examples/images -o captions.jsonl
  vlm-engine caption "photos/**/*.jpg" -o captions.csv --model ~/models/gemma-3-4b-it \\
      --prompt "Describe the image in one sentence." --max-tokens 96
  vlm-engine caption todo.txt -o captions.jsonl --temperature 0.7 --top-p 0.9 --seed 0
  vlm-engine caption examples/images -o shapes.jsonl --prompt "Describe the image as JSON." \
      --json-schema schema.json --max-tokens 80
  vlm-engine caption examples/images -o kinds.csv --choice circle --choice square"""

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


# ---- caption -----------------------------------------------------------------------------------


def cmd_caption(args: argparse.Namespace) -> int:
    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
            structured_outputs=_constraint(args),
        )
        if args.ray is not None:
            return _caption_on_ray(args, params)
        if args.replicas is not None:
            args.parser.error("--replicas needs --ray")
        summary = caption_sources(
            args.inputs,
            args.output,
            model=args.model,
            device=args.device,
            dtype=args.dtype,
            format=args.format,
            prompt=args.prompt,
            params=params,
            batch_size=args.batch_size,
            use_tqdm=not args.quiet,
            ec_connector=args.ec_connector,
            quantization=args.quantization,
        )
    except USAGE_ERRORS as e:
        args.parser.error(str(e))
    print(f"{summary} -> {args.output}")
    return 0


def _constraint(args: argparse.Namespace) -> dict[str, object] | None:
    """The structured-outputs constraint the options ask for, if any (at most one is given)."""
    if args.json_schema is not None:
        try:
            return {"json": json.loads(Path(args.json_schema).read_text(encoding="utf-8"))}
        except (OSError, ValueError) as e:
            raise InvalidSamplingParamsError(
                f"--json-schema {args.json_schema}: not a readable JSON file ({e})"
            ) from None
    if args.grammar is not None:
        try:
            return {"grammar": Path(args.grammar).read_text(encoding="utf-8")}
        except OSError as e:
            raise InvalidSamplingParamsError(f"--grammar {args.grammar}: {e}") from None
    if args.regex is not None:
        return {"regex": args.regex}
    if args.choice is not None:
        return {"choice": args.choice}
    return None


def _caption_on_ray(args: argparse.Namespace, params: SamplingParams) -> int:
    try:
        from vlm_engine.distributed import caption_dataset  # ray, only when asked for
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] not in ("ray", "pyarrow", "pandas"):
            raise
        args.parser.error("--ray needs the ray extra: pip install 'vlm_engine[ray]'")
    options = {"device": args.device, "dtype": args.dtype}
    if args.ec_connector:
        options["ec_connector"] = args.ec_connector
    if args.quantization:
        options["quantization"] = args.quantization
    try:
        summary = caption_dataset(
            args.inputs,
            args.output,
            model=args.model,
            prompt=args.prompt,
            params=params,
            replicas=args.replicas,
            batch_size=args.batch_size,
            format=args.format,
            address=args.ray or None,
            engine_options=options,
        )
    except KeyboardInterrupt:
        print(f"interrupted: the rows in {args.output} are kept; rerun to caption the rest")
        return 130
    print(f"{summary} -> {args.output}")
    return 0


def add_caption_parser(sub) -> None:
    cap = sub.add_parser(
        "caption",
        help="caption a folder, glob or list of images into JSONL or CSV, resumably",
        description=CAPTION_DESCRIPTION,
        epilog=CAPTION_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cap.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="folders of images, glob patterns (quoted; ** recurses), list files (.txt/.lst, "
        "one path per line, relative to the list's folder) or image files",
    )
    cap.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="FILE",
        help="the JSONL or CSV file to write (appended to)",
    )
    cap.add_argument(
        "--format",
        choices=("jsonl", "csv"),
        help="output format (default: from the output's suffix, .jsonl or .csv)",
    )
    cap.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        help="images per engine call; rows are written after each (default: %(default)s)",
    )
    add_model_options(cap)
    cap.add_argument(
        "--prompt",
        default=DEMO_PROMPT,
        help="the instruction after each image (default: %(default)r, the demo model's)",
    )
    cap.add_argument(
        "--max-tokens",
        type=int,
        default=DEFAULT_MAX_TOKENS,
        help="most tokens per caption (default: %(default)s)",
    )
    cap.add_argument(
        "--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)"
    )
    cap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    cap.add_argument("--top-k", type=int, default=0, help="0 disables top-k (default: 0)")
    cap.add_argument("--seed", type=int, default=None, help="sampling seed of each request")
    constraint = cap.add_mutually_exclusive_group()
    constraint.add_argument(
        "--json-schema",
        metavar="FILE",
        help="hold each caption to the JSON schema in FILE (rows gain the parsed object)",
    )
    constraint.add_argument(
        "--regex", metavar="PATTERN", help="hold each caption to a regular expression"
    )
    constraint.add_argument(
        "--choice",
        action="append",
        metavar="TEXT",
        help="each caption is exactly one of the choices (repeat the option for each)",
    )
    constraint.add_argument(
        "--grammar", metavar="FILE", help="hold each caption to the EBNF grammar in FILE"
    )
    cap.add_argument(
        "--ec-connector",
        default=None,
        metavar="SPEC",
        help="persistent encoder cache shared across runs and replicas: disk:/path or "
        "redis://host:port/db",
    )
    cap.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="run on a Ray cluster (the ray extra): ADDRESS of its head (e.g. auto or "
        "host:6379); without one, the cluster $RAY_ADDRESS names or a new local instance. "
        "Identical images are captioned once",
    )
    cap.add_argument(
        "--replicas",
        type=positive_int,
        default=None,
        help="engines on the cluster, one per GPU (default: one per GPU, or one without GPUs)",
    )
    cap.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    cap.set_defaults(func=cmd_caption, parser=cap)


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


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text}")
    return value


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="DIR",
        help="HF Gemma3 checkpoint directory (default: the built-in demo model)",
    )
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights and activations (default: auto, bfloat16 on a GPU, float32 on a CPU)",
    )
    parser.add_argument(
        "--quantization",
        choices=QUANTIZATIONS,
        default=None,
        help="fp8: quantize the decoder's projections to FP8 at load; fp8-all: the vision tower's "
        "linear layers too (FP8 checkpoints are FP8 already)",
    )


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


if __name__ == "__main__":
    sys.exit(main())
