"""Offline throughput of vlm_engine against transformers `generate`, measured in the same run.

Both sides load one random-weight Gemma3 checkpoint and turn the same raw prompts and images into
greedy tokens of a fixed length (min = max tokens, so every request yields exactly --output-len
tokens). Wall time covers everything from raw inputs to output tokens: tokenization and image
preprocessing included on both sides. transformers runs batched `generate` with left padding;
the engine receives every request at once and schedules them itself. After one warm-up, the
sides take turns over --rounds rounds, each on fresh prompts and images; the table shows medians.

    python benchmarks/engine_vs_transformers.py [--num-requests 64] [--output-len 32]
        [--hf-batch-size 16] [--device cpu|cuda] [--dtype auto] [--model-size tiny|small]
        [--rounds 5] [--seed 0] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, Gemma3ForConditionalGeneration, ProcessorMixin

# Run as a file, Python puts benchmarks/ first on sys.path, and the editable install's path hook
# then resolves `vlm_engine` to an empty namespace package: import this checkout's package instead.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vlm_engine import Engine, SamplingParams  # noqa: E402
from vlm_engine.testing import make_tiny_checkpoint  # noqa: E402
from vlm_engine.testing.samples import WORDS  # noqa: E402

# TinySpec overrides per --model-size; "tiny" is TinySpec's own defaults.
MODEL_SIZES: dict[str, dict[str, int]] = {
    "tiny": {},
    "small": {
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "sliding_window": 64,
        "vision_hidden_size": 64,
        "vision_intermediate_size": 128,
    },
}
KINDS = ("text", "one_image", "two_images")
WARMUP_REQUESTS = 6
WARMUP_OUTPUT_LEN = 4


@dataclass(frozen=True)
class BenchRequest:
    text: str  # with one "<start_of_image>" marker per image
    images: list[Image.Image]


@dataclass(frozen=True)
class Round:
    wall_s: float
    num_requests: int
    num_output_tokens: int


@dataclass
class SideResult:
    """One side's timed rounds; each figure is the median over rounds."""

    name: str
    rounds: list[Round] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return statistics.median(r.wall_s for r in self.rounds)

    @property
    def requests_per_s(self) -> float:
        return statistics.median(r.num_requests / r.wall_s for r in self.rounds)

    @property
    def output_tokens_per_s(self) -> float:
        return statistics.median(r.num_output_tokens / r.wall_s for r in self.rounds)

    def to_json(self) -> dict:
        medians = {
            "wall_s": self.wall_s,
            "requests_per_s": self.requests_per_s,
            "output_tokens_per_s": self.output_tokens_per_s,
        }
        return {"name": self.name, **medians, "rounds": [asdict(r) for r in self.rounds]}


# ---- workload --------------------------------------------------------------------------------


def random_image(rng: np.random.Generator) -> Image.Image:
    width, height = rng.integers(24, 160, 2)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def random_words(rng: np.random.Generator, low: int, high: int) -> str:
    # The first 15 sample words: the vocabulary the figures in docs/performance.md were taken with.
    return " ".join(rng.choice(WORDS[:15], int(rng.integers(low, high))))


def make_workload(num_requests: int, seed: int, round_index: int) -> list[BenchRequest]:
    """Requests cycle through text-only, one image and two images; words and pixels are seeded.
    Each round draws its own prompts and images, so no round hits another's caches."""
    rng = np.random.default_rng([seed, round_index])
    requests = []
    for i in range(num_requests):
        num_images = i % len(KINDS)  # KINDS[num_images]
        parts = [random_words(rng, 8, 40)]
        for _ in range(num_images):
            parts += ["<start_of_image>", random_words(rng, 2, 12)]
        images = [random_image(rng) for _ in range(num_images)]
        requests.append(BenchRequest(" ".join(parts), images))
    return requests


# ---- the two sides ---------------------------------------------------------------------------


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(device: str, fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    synchronize(device)
    start = time.perf_counter()
    token_ids = fn()
    synchronize(device)
    return time.perf_counter() - start, token_ids


def engine_generate(
    engine: Engine, workload: list[BenchRequest], output_len: int
) -> list[list[int]]:
    prompts = [{"prompt": r.text, "images": r.images} for r in workload]
    params = SamplingParams(temperature=0, max_tokens=output_len, min_tokens=output_len)
    return [out.token_ids for out in engine.generate(prompts, params)]


def hf_generate_batch(
    model: Gemma3ForConditionalGeneration,
    processor: ProcessorMixin,
    batch: list[BenchRequest],
    output_len: int,
) -> list[list[int]]:
    images = [r.images for r in batch]
    inputs = processor(
        text=[r.text for r in batch],
        images=images if any(images) else None,
        return_tensors="pt",
        padding=True,
    )
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        out = model.generate(
            **inputs, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False
        )
    # [batch, padded_prompt_len + output_len]: left padding puts every prompt's end at one column.
    return out[:, inputs["input_ids"].shape[1] :].tolist()


def hf_generate(
    model: Gemma3ForConditionalGeneration,
    processor: ProcessorMixin,
    workload: list[BenchRequest],
    output_len: int,
    batch_size: int,
) -> list[list[int]]:
    token_ids = []
    for start in range(0, len(workload), batch_size):
        batch = workload[start : start + batch_size]
        token_ids += hf_generate_batch(model, processor, batch, output_len)
    return token_ids


def load_transformers(
    checkpoint: Path, device: str, dtype: torch.dtype
) -> tuple[Gemma3ForConditionalGeneration, ProcessorMixin]:
    model = Gemma3ForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype)
    processor = AutoProcessor.from_pretrained(checkpoint, backend="pil")
    processor.tokenizer.padding_side = "left"
    return model.to(device).eval(), processor


# ---- reporting -------------------------------------------------------------------------------


def count_agreeing(engine_ids: list[list[int]], hf_ids: list[list[int]]) -> int:
    return sum(a == b for a, b in zip(engine_ids, hf_ids, strict=True))


def format_table(engine: SideResult, hf: SideResult) -> str:
    rows = [
        ("requests/s", engine.requests_per_s, hf.requests_per_s),
        ("output tokens/s", engine.output_tokens_per_s, hf.output_tokens_per_s),
        ("total wall time (s)", engine.wall_s, hf.wall_s),
    ]
    lines = [
        f"| {'metric':<20} | {'vlm_engine':>11} | {'transformers':>12} | {'engine / hf':>11} |",
        f"|{'-' * 22}|{'-' * 12}:|{'-' * 13}:|{'-' * 12}:|",
    ]
    for label, ours, theirs in rows:
        lines.append(f"| {label:<20} | {ours:>11.2f} | {theirs:>12.2f} | {ours / theirs:>10.2f}x |")
    return "\n".join(lines)


def describe_device(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpuinfo = Path("/proc/cpuinfo")
    names = [
        line.split(":", 1)[1].strip()
        for line in (cpuinfo.read_text().splitlines() if cpuinfo.exists() else [])
        if line.startswith("model name")
    ]
    name = names[0] if names else platform.machine()
    return f"{name}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        return dtype
    return "bfloat16" if device == "cuda" else "float32"


# ---- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32, help="tokens per request")
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"))
    parser.add_argument("--model-size", choices=tuple(MODEL_SIZES), default="tiny")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds; medians reported")
    parser.add_argument("--seed", type=int, default=0, help="checkpoint weights and workload")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write results as JSON")
    args = parser.parse_args(argv)
    for name in ("num_requests", "output_len", "hf_batch_size", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    args.dtype = resolve_dtype(args.dtype or "auto", args.device)
    return args


def run(args: argparse.Namespace, checkpoint: Path) -> dict:
    """Warm both sides up, then time them in alternation, one fresh workload per round."""
    engine = Engine(checkpoint, device=args.device, dtype=args.dtype)
    model, processor = load_transformers(checkpoint, args.device, getattr(torch, args.dtype))
    sides = {
        "engine": partial(engine_generate, engine),
        "transformers": partial(hf_generate, model, processor, batch_size=args.hf_batch_size),
    }
    warmup = make_workload(WARMUP_REQUESTS, args.seed, round_index=0)
    for generate in sides.values():
        generate(warmup, WARMUP_OUTPUT_LEN)
    results = {"engine": SideResult("vlm_engine"), "transformers": SideResult("transformers")}
    num_agreeing = 0
    for round_index in range(1, args.rounds + 1):
        workload = make_workload(args.num_requests, args.seed, round_index)
        token_ids = {}
        for name, generate in sides.items():
            wall_s, token_ids[name] = timed(
                args.device, partial(generate, workload, args.output_len)
            )
            num_tokens = sum(map(len, token_ids[name]))
            results[name].rounds.append(Round(wall_s, len(workload), num_tokens))
        num_agreeing += count_agreeing(token_ids["engine"], token_ids["transformers"])
    return {
        **results,
        "num_agreeing": num_agreeing,
        "hf_attn_implementation": model.config._attn_implementation,
        "engine_stats": engine.stats(),  # warm-up included
    }


def report(args: argparse.Namespace, result: dict, device: str) -> None:
    engine, hf = result["engine"], result["transformers"]
    print(
        f"{args.num_requests} requests ({', '.join(KINDS)} in turn), {args.output_len} greedy "
        f"tokens each; model {args.model_size}, {args.dtype} on {args.device} ({device}); "
        f"transformers batch {args.hf_batch_size}, attention {result['hf_attn_implementation']}; "
        f"median of {args.rounds} rounds"
    )
    print(format_table(engine, hf))
    for side in (engine, hf):
        walls = ", ".join(f"{r.wall_s:.2f}" for r in side.rounds)
        print(f"{side.name} wall time per round (s): {walls}")
    num_total = args.num_requests * args.rounds
    print(f"greedy tokens agree exactly: {result['num_agreeing']}/{num_total} requests")


def write_json(path: Path, args: argparse.Namespace, result: dict, device: str) -> None:
    payload = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "device": device,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        **result,
        "engine": result["engine"].to_json(),
        "transformers": result["transformers"].to_json(),
    }
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    transformers.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_tiny_checkpoint(tmp, seed=args.seed, **MODEL_SIZES[args.model_size])
        result = run(args, checkpoint)
    device = describe_device(args.device)
    report(args, result, device)
    if args.json:
        write_json(args.json, args, result, device)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
