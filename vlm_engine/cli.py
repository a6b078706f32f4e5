"""`vlm-engine` command line.

`generate`: answer a prompt about each image given (files or folders) with the engine, batched
and greedy, printing one line per image. Without `--model` it uses the built-in demo checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path

from vlm_engine.demo.model import DEMO_PROMPT

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


@contextlib.contextmanager
def model_dir(model: str | None) -> Iterator[Path]:
    """The given checkpoint, or the built-in demo model that ships with the package (a small
    Gemma3 trained to caption pictures of shapes; see `vlm_engine.demo`)."""
    if model is not None:
        yield Path(model)
        return
    from vlm_engine.demo import default_model_path

    yield default_model_path()


def image_paths(sources: list[str]) -> list[Path]:
    paths = []
    for source in map(Path, sources):
        if source.is_dir():
            paths += sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(source)
    return paths


def cmd_generate(args: argparse.Namespace) -> int:
    from vlm_engine import Engine, SamplingParams

    paths = image_paths(args.images)
    with model_dir(args.model) as path:
        engine = Engine(path, device=args.device, dtype=args.dtype)
    prompts = [chat_prompt(path, args.prompt) for path in paths]
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    for path, out in zip(paths, engine.generate(prompts, params), strict=True):
        print(f"{path.name}\t{out.text!r}")
    return 0


def chat_prompt(image: Path, question: str) -> dict:
    content = [{"type": "image", "image": str(image)}, {"type": "text", "text": question}]
    return {"messages": [{"role": "user", "content": content}]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-engine", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate",
        help="answer a prompt about each image (greedy)",
        description="Answer a prompt about each image, greedy decoding.",
    )
    gen.add_argument("images", nargs="+", help="image files or folders of images")
    gen.add_argument("--model", help="HF Gemma3 checkpoint directory (default: built-in demo)")
    gen.add_argument(
        "--prompt",
        default=DEMO_PROMPT,
        help="question for every image (default: the one the demo model was trained on)",
    )
    gen.add_argument("--max-tokens", type=int, default=16, help="tokens to generate per image")
    gen.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    gen.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
