"""`vlm-engine caption`: caption many images into a JSONL or CSV file, resumably, in this process
or on a Ray cluster (`--ray`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vlm_engine.captioning import DEFAULT_BATCH_SIZE, DEFAULT_MAX_TOKENS, caption_sources
from vlm_engine.cli.options import USAGE_ERRORS, add_model_options, positive_int
from vlm_engine.demo.model import DEMO_PROMPT
from vlm_engine.errors import InvalidSamplingParamsError
from vlm_engine.sampling_params import SamplingParams

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
  vlm-engine caption examples/images -o shapes.jsonl --prompt "Describe the image as JSON." \\
      --json-schema schema.json --max-tokens 80
  vlm-engine caption examples/images -o kinds.csv --choice circle --choice square"""


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
