"""`vlm-engine` command line.

`generate`: answer a prompt about each image given (files or folders), greedy, printing one line
per image. Without `--model` it uses the built-in demo checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def default_model_dir() -> Path:
    """The demo checkpoint: a tiny random-weight Gemma3, made on first use (no download)."""
    from vlm_engine.testing import make_tiny_checkpoint

    path = Path.home() / ".cache" / "vlm_engine" / "demo-tiny-v1"
    if not (path / "config.json").is_file():
        make_tiny_checkpoint(path, seed=0)
    return path


def image_paths(sources: list[str]) -> list[Path]:
    paths = []
    for source in map(Path, sources):
        if source.is_dir():
            paths += sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(source)
    return paths


def cmd_generate(args: argparse.Namespace) -> int:
    from vlm_engine.pipeline import VisionLanguagePipeline

    if args.model is None:
        print(
            "note: the built-in demo checkpoint has random weights until a trained one ships, "
            "so its answers are noise; pass --model DIR for a real Gemma3 checkpoint.",
            file=sys.stderr,
        )
    pipeline = VisionLanguagePipeline.load(
        args.model or default_model_dir(), dtype=args.dtype, device=args.device
    )
    for path in image_paths(args.images):
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": str(path)},
                    {"type": "text", "text": args.prompt},
                ],
            }
        ]
        text = pipeline.generate_chat(messages, max_new_tokens=args.max_tokens)
        print(f"{path.name}\t{text!r}")
    return 0


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
    gen.add_argument("--prompt", default="Describe the image.", help="question for every image")
    gen.add_argument("--max-tokens", type=int, default=16, help="tokens to generate per image")
    gen.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto")
    gen.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
